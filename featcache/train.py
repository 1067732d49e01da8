"""``featcache train``: Stage 1, joint training of backbone + linear classifier under instance-,
class-, square-root- or progressively-balanced sampling (Kang et al. 2020, Sec. 3).

Each epoch is reseeded from (seed, epoch), so ``--resume`` from ``last.pt`` reaches the same
weights as an uninterrupted run. Under ``torchrun`` the model is wrapped in DDP and each rank takes
its slice of one global index stream; only rank 0 logs and writes checkpoints."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .backbones import build_model, model_channels
from .batches import iterate_batches
from .datasets import DataSpec
from .distributed import Dist, resolve_device
from .errors import FeatcacheError
from .extract import as_data_spec, versions
from .foundation import OPEN_CLIP, TIMM, timm_for_training, timm_transform
from .safe_pickle import torch_load
from .sampling import SAMPLERS, ClassSampler, class_probabilities

CHECKPOINT_FORMAT = "featcache-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(kw_only=True)
class TrainConfig:
    """What ``featcache train`` runs: the data, the network, where to write, and the SGD schedule."""

    data: DataSpec
    arch: str
    out: str
    sampler: str = "instance"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    epoch_draws: int | None = None
    augment: bool = True
    num_workers: int = 0
    resume: bool = False
    progress: bool = True
    init: str | None = None  # timm/ archs: start from this checkpoint (head re-initialised)
    trust_checkpoint: bool = False  # --resume: allow full unpickling of OUT/last.pt
    overwrite: bool = False  # start a run folder that holds a run over (its checkpoints and log)

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["data"] = self.data.to_dict()
        del payload["trust_checkpoint"], payload["overwrite"]
        return payload


RUN_FILES = ("last.pt", "best.pt", "log.jsonl")  # what a run writes into its folder
MAX_EPOCHS_VARIABLE = "FEATCACHE_MAX_EPOCHS"  # caps every training's epochs (smoke tests of docs and scripts)


def capped_epochs(epochs: int) -> int:
    """``epochs``, or at most ``$FEATCACHE_MAX_EPOCHS`` where that is set (said on stderr): a smoke
    test runs the documented commands as written, in seconds."""
    cap = os.environ.get(MAX_EPOCHS_VARIABLE)
    if not cap:
        return epochs
    if not cap.isdigit() or int(cap) < 1:
        raise FeatcacheError(f"${MAX_EPOCHS_VARIABLE}={cap!r}: expected a whole number of epochs, at least 1")
    if epochs > int(cap):
        print(f"note: ${MAX_EPOCHS_VARIABLE}={cap}: training {cap} of the {epochs} epochs asked for", file=sys.stderr)
    return min(epochs, int(cap))


def _prepare_run_dir(out: Path, config: TrainConfig) -> None:
    """Refuse a folder that already holds a run unless it is resumed or, with ``overwrite``, started
    over (only the run's own files are removed); anything else in it is never touched."""
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"--out {out} is not a directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and config.resume and config.overwrite:
        raise FeatcacheError("--resume and --overwrite exclude each other")
    if found and not config.resume:
        if not config.overwrite:
            raise FeatcacheError(f"--out {out} already holds a run ({', '.join(found)}): --resume continues it, "
                                 "--overwrite starts it over, or choose another --out")
        if Dist.from_env().is_main:
            for name in found:
                (out / name).unlink()
    if config.resume and "log.jsonl" in found and "last.pt" not in found:
        raise FeatcacheError(f"--resume: {out} has a log.jsonl but no last.pt to continue from; --overwrite starts "
                             "the run over")
    out.mkdir(parents=True, exist_ok=True)


def _save_checkpoint(payload: dict, path: Path) -> None:
    from .store import atomic_output
    with atomic_output(path) as handle:
        torch.save(payload, handle)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2 ** 63)


@torch.no_grad()
def evaluate_model(model, source, samples, train_counts, device, channels, batch_size=512, transform=None) -> dict:
    from .metrics import evaluate
    model.eval()
    logits = [model(x.to(device)).float().cpu().numpy()
              for x, _, _ in iterate_batches(source, samples, np.arange(len(samples)), batch_size, channels=channels,
                                             transform=transform)]
    return evaluate(np.concatenate(logits), samples.labels, train_counts)


def _build(config: TrainConfig, source):
    """(model, channels, train transform, eval transform); the transforms are timm's for timm/ archs
    (with the data set's own augmentation switch), else None: the data set's."""
    if config.arch.startswith(OPEN_CLIP):
        raise FeatcacheError(f"--arch {config.arch}: open_clip towers are for extraction; train a timm/ arch")
    if not config.arch.startswith(TIMM):
        if config.init:
            raise FeatcacheError(f"--init works with timm/ archs, not {config.arch}")
        return build_model(config.arch, source.num_classes, source.channels), \
            model_channels(config.arch, source.channels), None, None
    model = timm_for_training(config.arch, source.num_classes, config.init, config.trust_checkpoint)
    eval_tf = timm_transform(model, config.data.options.get("resize"),
                             config.data.options.get("crop"))
    train_tf = timm_transform(model, None, None, training=True) if config.augment else eval_tf
    return model, 3, train_tf, eval_tf


def train(config: TrainConfig) -> Path:
    """Train and return the path of ``last.pt``."""
    from tqdm.auto import tqdm

    if config.sampler not in SAMPLERS:
        raise FeatcacheError(f"--sampler {config.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if config.epochs < 1:
        raise FeatcacheError(f"--epochs must be at least 1 (got {config.epochs})")
    config = replace(config, epochs=capped_epochs(config.epochs))
    dist = Dist.from_env()
    device = dist.device(resolve_device(config.device))
    source = config.data.load()
    train_split = source.split("train")
    val_split = source.splits.get("val")
    counts = train_split.class_counts(source.num_classes)
    if config.batch_size % dist.world_size:
        raise FeatcacheError(f"--batch-size {config.batch_size} must divide among {dist.world_size} processes")
    out = Path(config.out)
    _prepare_run_dir(out, config)

    torch.manual_seed(config.seed)
    model, channels, train_tf, eval_tf = _build(config, source)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=0.0)
    start_epoch, best_top1 = 0, -1.0
    if config.resume and (out / "last.pt").is_file():
        last = out / "last.pt"
        state = torch_load(last.read_bytes(), last, arrays=False, trust=config.trust_checkpoint,
                           trust_flag="--trust-checkpoint")
        for key in ("arch", "sampler", "seed", "epochs"):
            if state["args"][key] != getattr(config, key):
                why = (f" (its cosine schedule is {state['args'][key]} epochs long: another --epochs would move "
                       "its learning rate; train a new run instead)" if key == "epochs" else "")
                raise FeatcacheError(f"--resume: {out / 'last.pt'} was trained with --{key} {state['args'][key]}, "
                                     f"not {getattr(config, key)}{why}")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best_top1 = state["epoch"] + 1, state.get("best_top1", -1.0)
        if dist.is_main:
            print(f"resuming from epoch {start_epoch + 1} of {config.epochs} ({last})" if start_epoch < config.epochs
                  else f"{last} has trained all {config.epochs} epochs: nothing left to train", file=sys.stderr, flush=True)
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ClassSampler(train_split.labels, source.num_classes)
    draws = config.epoch_draws or len(train_split)
    per_rank_batch = config.batch_size // dist.world_size
    use_amp = device.type == "cuda"
    log_path = out / "log.jsonl"
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        probs = class_probabilities(counts, config.sampler, epoch, config.epochs)
        indices = sampler.draw(probs, draws, torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0)))
        histogram = np.bincount(train_split.labels[indices.numpy()], minlength=source.num_classes)
        mine = indices[dist.rank::dist.world_size].numpy()
        torch.manual_seed(_epoch_seed(config.seed, epoch, 1 + dist.rank))
        augment_gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 1000 + dist.rank))
        net.train()
        total_loss, seen = 0.0, 0
        bar = tqdm(total=len(mine), unit="img", desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and dist.is_main), dynamic_ncols=True, leave=False)
        for x, y, _ in iterate_batches(source, train_split, mine, per_rank_batch, augment=config.augment,
                                       channels=channels, num_workers=config.num_workers, generator=augment_gen,
                                       transform=train_tf):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
            bar.update(len(y))
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        seconds = time.perf_counter() - began
        dist.barrier()
        if not dist.is_main:
            continue
        val = (evaluate_model(model, source, val_split, counts, device, channels, transform=eval_tf)
               if val_split is not None else {})
        record = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "lr": lr, "seconds": round(seconds, 3),
                  "images_per_s": round(seen * dist.world_size / max(seconds, 1e-9), 1),
                  "val": {k: val.get(k) for k in ("top1", "many", "medium", "few")},
                  "sampler": config.sampler, "class_draws": histogram.tolist()}
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if config.progress:
            shown = f" val top1 {val['top1']:.2f}" if val else ""
            print(f"epoch {epoch + 1}/{config.epochs} loss {record['loss']:.4f} lr {lr:.4f}{shown} "
                  f"({record['images_per_s']:.0f} img/s)", flush=True)
        top1 = val.get("top1", -1.0) if val else -1.0
        improved = top1 > best_top1
        best_top1 = max(best_top1, top1)
        payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "arch": config.arch,
                   "num_classes": source.num_classes, "in_channels": channels,
                   "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(),
                   "rng": {"torch": torch.get_rng_state()},
                   "epoch": epoch, "epochs": config.epochs, "best_top1": best_top1, "val": record["val"],
                   "args": config.to_dict(), "data": config.data.to_dict(),
                   "train_ids": torch.from_numpy(train_split.ids), "class_counts": counts.tolist(),
                   "versions": versions()}
        _save_checkpoint(payload, out / "last.pt")
        if improved and val:
            _save_checkpoint(payload, out / "best.pt")
    dist.barrier()
    return out / "last.pt"


def train_backbone(data: str | DataSpec, arch: str, out: str | Path, *, data_root: str | Path | None = None,
                   data_options: dict | None = None, **options) -> Path:
    """``featcache train`` from Python (also ``featcache.train_backbone``). Returns the path of ``last.pt``.

    ``data`` is a data set name (``featcache datasets``) with ``data_root`` and ``data_options``
    (e.g. ``{"imbalance": 10}``), or a :class:`DataSpec`; ``options`` are :class:`TrainConfig`'s
    other fields (``sampler``, ``epochs``, ``lr``, ``resume``, ``progress`` ...)::

        import featcache
        last = featcache.train_backbone(data="digits-lt", arch="tinycnn", epochs=30, out="runs/digits")
    """
    spec = as_data_spec(data, data_root, data_options)
    if spec is None:
        raise FeatcacheError("featcache.train_backbone needs data: a data set name or a DataSpec")
    return train(TrainConfig(data=spec, arch=arch, out=str(out), **options))

