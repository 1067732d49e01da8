"""Foundation backbones, delegated to their libraries (nothing here re-implements a model):
``timm/NAME[.TAG]`` is any model timm knows, ``open_clip/MODEL[.TAG]`` the image tower of an
open_clip model, optionally with its zero-shot head as the entry's classifier.

Models are built with random weights and then given the ``--ckpt`` weights (``--ckpt random``:
kept random, drawn with a seed), so nothing is ever downloaded. The eval transform is the library's own (timm's data config, open_clip's preprocess);
``--resize`` / ``--crop`` replace only the resize and crop sizes.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .checkpoints import RANDOM_FORMAT, initialising
from .errors import FeatcacheError

TIMM, OPEN_CLIP = "timm/", "open_clip/"
# "a photo of a {}." and the seven templates CLIP's authors chose for ImageNet ensembles.
DEFAULT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                     "a photo of the small {}.")


def is_foundation(arch: str | None) -> bool:
    return bool(arch) and arch.startswith((TIMM, OPEN_CLIP))


@dataclass
class Backbone:
    """A network with its weights, ready to extract, and what the cache entry records about it."""

    model: nn.Module
    features: Callable[[torch.Tensor], torch.Tensor]
    feature_dim: int
    num_classes: int | None  # the classifier's classes; None: no classifier
    classifier: Callable[[], tuple[np.ndarray, np.ndarray]] | None  # (W, b), computed only for a new entry
    head: str  # what the entry's classifier is, or why there is none
    channels: int | None = None  # what the network takes (the data set's transform repeats gray images)
    transform: tuple[Callable, int] | None = None  # (PIL image -> tensor, output side); None: the data set's
    transform_description: str | None = None
    key: dict = field(default_factory=dict)  # added to the cache key
    meta: dict = field(default_factory=dict)  # the manifest's "backbone" record


@dataclass
class ZeroShot:
    """The zero-shot head's inputs: one name per class, prompt templates with ``{}``."""

    class_names: list[str]
    templates: list[str]


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or exc
        raise FeatcacheError(f"{what} {path} cannot be read: {reason}") from None
    if not lines:
        raise FeatcacheError(f"{what} {path} is empty")
    return lines


def zeroshot_inputs(class_names: list[str], num_classes: int, class_names_file: str | None,
                    templates_file: str | None) -> ZeroShot:
    """Class names (the file's, else the data set's) and templates (the file's, else the defaults)."""
    if class_names_file:
        class_names = read_lines(class_names_file, "--class-names")
    if not class_names:
        raise FeatcacheError("--zeroshot-head needs class names: this data set has none, give --class-names FILE")
    if len(class_names) != num_classes:
        raise FeatcacheError(f"{len(class_names)} class names{' in ' + class_names_file if class_names_file else ''}"
                             f" for a data set of {num_classes} classes")
    seen: dict[str, int] = {}
    for number, class_name in enumerate(class_names):
        if class_name in seen:
            where = f"--class-names {class_names_file}" if class_names_file else "the data set's class names"
            raise FeatcacheError(f"{where}: class {number} and class {seen[class_name]} are both named "
                                 f"{class_name!r} (their zero-shot weights would be identical: one could never "
                                 "be predicted); give each class its own name")
        seen[class_name] = number
    templates = read_lines(templates_file, "--templates") if templates_file else list(DEFAULT_TEMPLATES)
    for template in templates:
        if "{}" not in template or template.count("{") != 1 or template.count("}") != 1:
            raise FeatcacheError(f"--templates {templates_file}: {template!r} must hold the class name "
                                 "as exactly one {} and no other braces")
    return ZeroShot(list(class_names), templates)


def load_weights(model: nn.Module, state_dict: dict, path: Path, arch: str, skip_prefix: str | None = None) -> None:
    """Load strictly (keys under ``skip_prefix`` are left as built), naming what does not fit."""
    expected = {k: v for k, v in model.state_dict().items()
                if not (skip_prefix and k.startswith(skip_prefix)) and not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state_dict.items()
             if not (skip_prefix and k.startswith(skip_prefix)) and not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = [f"{what} keys {keys[:5]}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    problems += [f"{key} has shape {tuple(given[key].shape)}, the arch expects {tuple(value.shape)}"
                 for key, value in expected.items() if key in given and given[key].shape != value.shape][:3]
    if problems:
        raise FeatcacheError(f"checkpoint {path} does not fit --arch {arch}: " + "; ".join(problems))
    model.load_state_dict(given, strict=False)


def _describe(transform) -> str:
    return " ".join(repr(transform).split())


def _resize_crop(resize: int, crop: int, interpolation: str, mean, std):
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(resize, interpolation=str_to_interp_mode(interpolation)),
                               transforms.CenterCrop(crop), transforms.ToTensor(),
                               transforms.Normalize(tuple(mean), tuple(std))])


# ---------------------------------------------------------------------------------------------
# timm


def _timm_name(arch: str) -> str:
    import timm
    name = arch[len(TIMM):]
    if not timm.is_model(name):
        raise FeatcacheError(f"--arch {arch}: timm has no model {name.split('.')[0]!r} "
                             "(list them with `featcache archs --timm PATTERN`)")
    return name


def timm_head(name: str) -> str | None:
    """The module name of the model's classifier, from timm's pretrained config (first of two heads)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None)
    return classifier[0] if isinstance(classifier, (tuple, list)) else classifier


def create_timm(arch: str, num_classes: int) -> nn.Module:
    """A timm model with random weights (``num_classes`` 0: no head)."""
    import timm
    name = _timm_name(arch)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise FeatcacheError(f"--arch {arch}: {exc}") from None


def timm_transform(model: nn.Module, resize: int | None, crop: int | None, training: bool = False):
    """timm's own transform for ``model`` (its data config); ``--resize`` / ``--crop`` replace the sizes."""
    import timm
    config = timm.data.resolve_model_data_config(model)
    if training:
        return timm.data.create_transform(**config, is_training=True), config["input_size"][-1]
    if resize is None and crop is None:
        return timm.data.create_transform(**config, is_training=False), config["input_size"][-1]
    crop = crop or config["input_size"][-1]
    resize = resize or math.floor(crop / config["crop_pct"])
    return _resize_crop(resize, crop, config["interpolation"], config["mean"], config["std"]), crop


def timm_backbone(arch: str, checkpoint, resize: int | None, crop: int | None, device: torch.device) -> Backbone:
    """``timm/NAME``: classes from the checkpoint's head; features = the head's pre-logits."""
    import timm
    name = _timm_name(arch)
    head = timm_head(name)
    weight = checkpoint.state_dict.get(f"{head}.weight") if head else None
    num_classes = int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else 0
    with initialising(checkpoint):
        model = create_timm(arch, num_classes)
    if checkpoint.format != RANDOM_FORMAT:
        load_weights(model, checkpoint.state_dict, checkpoint.path, arch)
    model = model.to(device).eval()
    layer = model.get_classifier()
    classifier = None
    if num_classes and isinstance(layer, nn.Linear):
        bias = layer.bias if layer.bias is not None else torch.zeros(num_classes)
        weights = (layer.weight.detach().float().cpu().numpy(), bias.detach().float().cpu().numpy())
        classifier = lambda: weights  # noqa: E731
        note = f"timm head {head!r} (linear, {num_classes} classes)"
    elif num_classes:
        note = f"none: the head {head} is {type(layer).__name__}, not a plain linear layer"
    else:
        note = ("none: random-init weights (--ckpt random)" if checkpoint.format == RANDOM_FORMAT
                else "none: the checkpoint has no head")
    transform, size = timm_transform(model, resize, crop)

    def features(x):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    meta = {"library": "timm", "version": timm.__version__, "model": name.split(".")[0],
            "pretrained_tag": model.pretrained_cfg.get("tag"), "head": note,
            "features": "forward_head(forward_features(x), pre_logits=True)",
            "data_config": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in timm.data.resolve_model_data_config(model).items()}}
    return Backbone(model, features, feature_dim, num_classes if classifier else None, classifier, note,
                    transform=(transform, size), transform_description=_describe(transform), meta=meta)


def timm_for_training(arch: str, num_classes: int, init: str | None, trust_checkpoint: bool = False) -> nn.Module:
    """A timm model for ``num_classes``; with ``init``, the checkpoint's weights and a fresh head."""
    from .checkpoints import load_checkpoint
    model = create_timm(arch, num_classes)
    if init:
        checkpoint = load_checkpoint(init, trust_checkpoint=trust_checkpoint)
        head = timm_head(_timm_name(arch))
        load_weights(model, checkpoint.state_dict, checkpoint.path, arch, skip_prefix=f"{head}." if head else None)
    return model


# ---------------------------------------------------------------------------------------------
# open_clip


@contextlib.contextmanager
def _quiet_logging():
    """open_clip logs a warning for every model built without pretrained weights: all of ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise FeatcacheError("--arch open_clip/...: open_clip is not installed "
                             "(pip install 'featcache[clip]')") from None
    return open_clip


def open_clip_backbone(arch: str, checkpoint, resize: int | None, crop: int | None, zeroshot: ZeroShot | None,
                       device: torch.device) -> Backbone:
    """``open_clip/MODEL[.TAG]``: features = L2-normalised ``encode_image``; the tag picks the pretrained
    config (mean / std / interpolation / QuickGELU); optional zero-shot head."""
    open_clip = import_open_clip()
    name, _, tag = arch[len(OPEN_CLIP):].partition(".")
    if name not in open_clip.list_models():
        raise FeatcacheError(f"--arch {arch}: open_clip has no model {name!r} (list them with "
                             "`featcache archs --open-clip`)")
    pretrained = {}
    if tag:
        pretrained = open_clip.get_pretrained_cfg(name, tag)
        if not pretrained:
            raise FeatcacheError(f"--arch {arch}: open_clip has no pretrained tag {tag!r} for {name} "
                                 f"(it has: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    with _quiet_logging(), initialising(checkpoint):
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, force_quick_gelu=bool(pretrained.get("quick_gelu")),
            image_mean=pretrained.get("mean"), image_std=pretrained.get("std"),
            image_interpolation=pretrained.get("interpolation"), image_resize_mode=pretrained.get("resize_mode"))
    if checkpoint.format != RANDOM_FORMAT:
        load_weights(model, checkpoint.state_dict, checkpoint.path, arch)
    model = model.to(device).eval()
    config = model.visual.preprocess_cfg
    size = config["size"][-1] if isinstance(config["size"], (tuple, list)) else config["size"]
    transform = preprocess
    if resize is not None or crop is not None:
        size = crop or size
        transform = _resize_crop(resize or size, size, config["interpolation"], config["mean"], config["std"])

    def features(x):
        return model.encode_image(x, normalize=True)
    classifier, note, key = None, "none: open_clip image tower (--zeroshot-head adds the zero-shot head)", {}
    if zeroshot is not None:
        def classifier():
            return zeroshot_head(model, open_clip.get_tokenizer(name), zeroshot, device)
        note = (f"zero-shot: logit_scale.exp() x L2-normalised mean text embedding over "
                f"{len(zeroshot.templates)} templates, b = 0")
        key = {"zeroshot_head": {"class_names": zeroshot.class_names, "templates": zeroshot.templates}}
    meta = {"library": "open_clip", "version": open_clip.__version__, "model": name, "pretrained_tag": tag or None,
            "features": "encode_image(x), L2-normalised", "head": note,
            "logit_scale": float(model.logit_scale.detach().exp()),
            "templates": zeroshot.templates if zeroshot else None,
            "class_names": zeroshot.class_names if zeroshot else None}
    return Backbone(model, features, int(open_clip.get_model_config(name)["embed_dim"]),
                    len(zeroshot.class_names) if zeroshot else None, classifier, note,
                    transform=(transform, size), transform_description=_describe(transform), key=key, meta=meta)


@torch.no_grad()
def zeroshot_head(model, tokenizer, zeroshot: ZeroShot, device) -> tuple[np.ndarray, np.ndarray]:
    """W = logit_scale.exp() x the L2-normalised mean of the normalised text embeddings of each class
    over the templates (open_clip's own ``build_zero_shot_classifier``), b = 0."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    embeddings = build_zero_shot_classifier(model, tokenizer, zeroshot.class_names, zeroshot.templates,
                                            device=device)  # dim x classes
    weight = (model.logit_scale.exp() * embeddings.T).float().cpu().numpy()
    return weight, np.zeros(len(weight), np.float32)
