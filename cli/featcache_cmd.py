"""`featcache`: train a backbone, extract its features into the cache, manage cache entries."""
from __future__ import annotations

import click

from .common import Group, comma_list, data_options, device_option, key_value, trust_checkpoint_option

CACHE_DIR = click.option("--cache-dir", type=click.Path(), envvar="FEATCACHE_DIR",
                         help="Cache root (default $FEATCACHE_DIR, else ~/.cache/featcache).")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="featcache", prog_name="featcache")
def main(debug):
    """Stage 1 of decoupled long-tailed recognition: train a backbone once, cache its features."""


@main.command()
@data_options(required=True)
@click.option("--arch", required=True, help="Architecture; see `featcache archs` (also timm/NAME).")
@click.option("--init", type=click.Path(), help="timm/ archs: start from this checkpoint's weights, head re-initialised.")
@click.option("--sampler", type=click.Choice(["instance", "class", "sqrt", "progressive"]), default="instance",
              show_default=True, help="Class-sampling strategy (p_j ~ n_j^q; progressive moves IB -> CB).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Epochs to train (capped at $FEATCACHE_MAX_EPOCHS where set: a smoke test of the docs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True, help="SGD learning rate (cosine to 0).")
@click.option("--wd", type=float, default=5e-4, show_default=True, help="Weight decay.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epoch-draws", type=click.IntRange(min=1), help="Samples drawn per epoch (default: training-set size).")
@click.option("--no-augment", is_flag=True, help="Switch the data set's augmentation off.")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Run directory (last.pt, best.pt, log.jsonl).")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (same --epochs, --arch, --sampler, --seed).")
@click.option("--overwrite", is_flag=True, help="Start over a run OUT already holds (its last.pt, best.pt, log.jsonl).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@trust_checkpoint_option
@device_option
def train(data_spec, arch, init, sampler, epochs, batch_size, lr, wd, momentum, seed, epoch_draws, no_augment,
          num_workers, out, resume, overwrite, quiet, trust_checkpoint, device):
    """Train a backbone + linear classifier jointly (Stage 1). Prints OUT/last.pt last.

    \b
    Example:
      featcache train --data digits-lt --arch tinycnn --sampler instance --epochs 30 --out runs/digits
      featcache train --data digits-lt --arch tinycnn --epochs 30 --out runs/digits --resume
    """
    from featcache.distributed import Dist
    from featcache.train import TrainConfig, train as run_train
    from featcache.backbones import get_arch
    from featcache.foundation import TIMM

    if not arch.startswith(TIMM):
        get_arch(arch)
    config = TrainConfig(data=data_spec, arch=arch, out=out, sampler=sampler, epochs=epochs, batch_size=batch_size,
                         lr=lr, weight_decay=wd, momentum=momentum, seed=seed, device=device, epoch_draws=epoch_draws,
                         augment=not no_augment, num_workers=num_workers, resume=resume, overwrite=overwrite,
                         progress=not quiet,
                         init=init, trust_checkpoint=trust_checkpoint)
    path = run_train(config)
    if Dist.from_env().is_main:
        click.echo(str(path))


@main.command()
@click.option("--ckpt", required=True, help="Checkpoint: own, state_dict (.pt/.pth/.bin, .safetensors), "
              "classifier-balancing, hf-hub:ORG/NAME from the local Hugging Face cache, or random[:SEED] for "
              "the --arch's random initialisation (no weights file; a file named random: ./random).")
@click.option("--arch", help="Architecture (default: recorded in the checkpoint): see `featcache archs`; "
              "timm/NAME[.TAG], open_clip/MODEL[.TAG].")
@data_options
@click.option("--split", "splits", multiple=True, help="Split(s) to extract; repeat or comma list (default train,val,test).")
@CACHE_DIR
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--shard-rows", type=click.IntRange(min=1), default=65536, show_default=True, help="Rows per HDF5 shard.")
@click.option("--allow-nonfinite", is_flag=True, help="Store NaN/Inf features instead of refusing.")
@click.option("--on-bad-image", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="An image that cannot be decoded: fail naming it, or leave it out with a warning.")
@click.option("--zeroshot-head", is_flag=True, help="open_clip: store the zero-shot head (class names x templates) "
              "as the entry's classifier.")
@click.option("--class-names", type=click.Path(), help="Zero-shot head: one class name per line (default: the data set's).")
@click.option("--templates", type=click.Path(), help="Zero-shot head: one prompt template per line, the class as {} "
              "(default: 8 built-in, 'a photo of a {}.' first).")
@click.option("--name", help="A name for the entry (usable wherever an entry is asked for; labels it in sweeps).")
@click.option("--views", type=click.IntRange(min=1), default=1, show_default=True,
              help="Views per training image: view 0 the eval transform, the others augmented (Stage 2 SGD "
                   "methods draw among them). Other splits keep one view.")
@click.option("--train-transform", default="default", show_default=True,
              help="Augmentation of views 1..K-1: default is the data set's own (image files: RandomResizedCrop, "
                   "flip, colour jitter as the official Stage 2); flip / crop / crop-flip for in-memory data sets, "
                   "official / rrc-flip for image files.")
@click.option("--view-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the augmented views (part of the key).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@trust_checkpoint_option
@device_option
def extract(ckpt, arch, data_spec, splits, cache_dir, dtype, compression, batch_size, num_workers,
            shard_rows, allow_nonfinite, on_bad_image, zeroshot_head, class_names, templates, name, views,
            train_transform, view_seed, quiet, trust_checkpoint, device):
    """Run the backbone over each split and cache its penultimate features.

    The last line printed is the entry directory. An identical second call is a hit ("cache hit"
    on stderr, no model built); an interrupted one resumes; a damaged entry is refused. A head
    whose classes are not the data set's is not stored (a warning says so).

    \b
    Example:
      featcache extract --ckpt runs/digits/last.pt
      featcache extract --ckpt runs/digits/last.pt --data digits-lt --views 4 --train-transform flip
      featcache extract --ckpt random --arch timm/resnet18 --data imagefolder --data-root data/flowers
    """
    from featcache.distributed import Dist
    from featcache.extract import ExtractRequest, extract as run_extract

    request = ExtractRequest(
        ckpt=ckpt, arch=arch, data=data_spec, splits=comma_list(splits) or None, cache_dir=cache_dir, dtype=dtype,
        batch_size=batch_size, num_workers=num_workers, shard_rows=shard_rows, compression=compression, device=device,
        allow_nonfinite=allow_nonfinite, progress=not quiet, on_bad_image=on_bad_image, zeroshot_head=zeroshot_head,
        class_names=class_names, templates=templates, name=name, trust_checkpoint=trust_checkpoint, views=views,
        train_transform=train_transform, view_seed=view_seed)
    path = run_extract(request)
    if Dist.from_env().is_main:
        click.echo(str(path))


@main.command(name="import")
@click.option("--split", "splits", multiple=True, required=True, metavar="NAME=FILE",
              help="A split's features: .npz / .pt (features, labels) or official pickle (feats, labels).")
@click.option("--classifier", type=click.Path(), help="Checkpoint whose fc.weight / fc.bias to store.")
@click.option("--name", required=True, help="A name for the entry (usable wherever an entry is asked for).")
@CACHE_DIR
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--allow-nonfinite", is_flag=True, help="Store NaN/Inf features instead of refusing.")
@click.option("--trust-pickle", is_flag=True,
              help="Fully unpickle .pkl / .pt feature files (it can run code: only for files you trust). "
                   "Default: numpy arrays, scalars and plain containers only.")
@trust_checkpoint_option
def import_(splits, classifier, name, cache_dir, dtype, allow_nonfinite, trust_pickle, trust_checkpoint):
    """Build a cache entry from features you already have. Prints the entry directory last.

    \b
    Example:
      featcache import --name clip-b16 --split train=train.npz --split val=val.npz \\
          --split test=test.npz --classifier final.pth
    """
    from featcache.importer import import_features

    path = import_features(key_value(splits, "--split"), name=name, classifier_ckpt=classifier,
                           cache_dir=cache_dir, dtype=dtype, allow_nonfinite=allow_nonfinite,
                           trust_pickle=trust_pickle, trust_checkpoint=trust_checkpoint)
    click.echo(str(path))


@main.command(name="ls")
@CACHE_DIR
def ls(cache_dir):
    """List every cache entry with its status: ok, incomplete, or damaged (with the reason).

    views: per training image; run: the `featcache train` run of its checkpoint
    (arch/sampler/epochs/seed); size: on disk.

    \b
    Example:
      featcache ls
      featcache ls --cache-dir /scratch/featcache
    """
    from tabulate import tabulate
    from featcache.store import cache_root, scan_entries
    from featcache.store.format import training_run_label
    from featcache.store.reader import format_bytes

    root = cache_root(cache_dir)
    rows = []
    for entry in scan_entries(root):
        meta = entry.cache.meta if entry.cache else {}
        size = sum(p.stat().st_size for p in entry.path.rglob("*") if p.is_file())
        rows.append([entry.path.name, meta.get("name") or "", meta.get("arch") or "", _data_name(meta),
                     training_run_label(meta) or "", ",".join(meta.get("splits", {})), _train_views(meta),
                     meta.get("feature_dim", ""), meta.get("dtype", ""), format_bytes(size),
                     meta.get("created", ""), entry.status])
    if not rows:
        click.echo(f"no entries under {root}")
        return
    click.echo(tabulate(rows, headers=["key", "name", "arch", "data", "run", "splits", "views", "dim", "dtype",
                                       "size", "created", "status"]))


def _train_views(meta: dict):
    """Views per image of the train split ("" without one)."""
    train = (meta.get("splits") or {}).get("train")
    return train.get("views", 1) if train else ""


def _data_name(meta: dict) -> str:
    spec = (meta.get("data") or {}).get("spec")
    return spec["name"] if spec else meta.get("kind", "")


def _entry(ref, cache_dir):
    from featcache.store import FeatureCache, cache_root, resolve_entry
    return FeatureCache.open(resolve_entry(ref, cache_root(cache_dir)))


@main.command()
@click.argument("entry")
@click.option("--counts", is_flag=True, help="Also list every split's per-class counts in full.")
@CACHE_DIR
def info(entry, counts, cache_dir):
    """Splits, rows, dim, dtype, class counts, arch, checkpoint (path, hash, run) and size of an entry.

    \b
    Example:
      featcache info digits
      featcache info 3f2a --counts
    """
    import numpy as np

    from featcache.store.format import training_run_label

    cache = _entry(entry, cache_dir)
    meta = cache.meta
    click.echo(f"entry        {cache.path}")
    click.echo(f"key          {cache.key}" + (f"  (name: {meta['name']})" if meta.get("name") else ""))
    click.echo(f"format       {meta['format_version']}    created {meta.get('created', '?')}")
    click.echo(f"arch         {meta.get('arch') or '-'}    data {_data_name(meta)}")
    click.echo(f"features     dim {meta['feature_dim']}, {meta['dtype']}, compression {meta.get('compression')}")
    checkpoint = meta.get("checkpoint") or {}
    click.echo(f"checkpoint   {checkpoint.get('path') or '-'}"
               + (f"  ({checkpoint['format']})" if checkpoint.get("format") else ""))
    click.echo(f"sha256       {checkpoint.get('sha256') or '-'}")
    click.echo(f"run          {training_run_label(meta) or '-'}")
    classifier = meta.get("classifier")
    head = (meta.get("backbone") or {}).get("head")  # timm / open_clip: what the classifier is, or why none
    if classifier:
        shown = "W " + "x".join(map(str, classifier["shape"])) + " and b" + (f"  ({head})" if head else "")
    else:
        shown = head or "none"
    click.echo(f"classifier   {shown}")
    click.echo(f"classes      {meta['num_classes']}")
    for name in cache.splits:
        class_counts = cache.class_counts(name)
        present = class_counts[class_counts > 0]
        summary = (f"max {present.max()}, median {np.median(present):g}, min {present.min()}, "
                   f"imbalance {present.max() / present.min():.1f}" if len(present) else "empty")
        views = cache.num_views(name)
        shown_views = f" ({views} views of {meta['splits'][name]['rows'] // views})" if views > 1 else ""
        click.echo(f"split {name:<7}{meta['splits'][name]['rows']:>9} rows{shown_views}, "
                   f"{len(meta['splits'][name]['shards'])} "
                   f"shard(s), {len(present)} classes ({summary})")
        if counts:
            click.echo(f"  per class  {','.join(map(str, class_counts.tolist()))}")
    click.echo(f"size         {cache.disk_bytes() / 2**20:.1f} MiB")


@main.command()
@click.argument("entry", required=False)
@click.option("--all", "all_entries", is_flag=True, help="Verify every entry under the cache root.")
@CACHE_DIR
def verify(entry, all_entries, cache_dir):
    """Re-hash every shard and check it against the manifest; exit 1 naming each bad one.

    \b
    Example:
      featcache verify digits
      featcache verify --all
    """
    from featcache.errors import FeatcacheError
    from featcache.store import cache_root, scan_entries

    if bool(entry) == all_entries:
        raise click.UsageError("give an ENTRY or --all")
    failed = False
    if entry:
        caches = [_entry(entry, cache_dir)]
    else:
        root, caches = cache_root(cache_dir), []
        statuses = scan_entries(root)
        if not statuses:
            click.echo(f"no entries under {root}")
        for status in statuses:
            if status.status == "incomplete":
                click.echo(f"INCOMPLETE {status.path} (no manifest: being written, or left by a killed writer)")
            elif status.cache is None:
                click.echo(f"BAD {status.path}: {status.status}", err=True)
                failed = True
            else:
                caches.append(status.cache)
    for cache in caches:
        try:
            problems = cache.verify()
        except FeatcacheError as exc:
            problems = [str(exc)]
        for problem in problems:
            click.echo(f"BAD {problem}", err=True)
        for path, why in cache.unlisted_files():  # a warning: no read uses them (docs/reliability.md)
            click.echo(f"UNLISTED {path}: {why}", err=True)
        if not problems:
            click.echo(f"OK {cache.path}")
        failed = failed or bool(problems)
    if failed:
        raise SystemExit(1)


@main.command()
@click.argument("entry")
@CACHE_DIR
def rm(entry, cache_dir):
    """Delete a cache entry (a key, key prefix, name or entry path; nothing that is not an entry).

    \b
    Example:
      featcache rm digits
      featcache rm 3f2a9c
    """
    from featcache.store import cache_root, remove_entry, resolve_entry
    path = resolve_entry(entry, cache_root(cache_dir))
    remove_entry(path)
    click.echo(f"removed {path}")


@main.command()
@click.option("--timm", "timm_", is_flag=True, help="List timm's models instead (timm/NAME).")
@click.option("--open-clip", is_flag=True, help="List open_clip's models and pretrained tags (open_clip/MODEL.TAG).")
@click.argument("pattern", required=False)
def archs(timm_, open_clip, pattern):
    """List the architectures; with --timm / --open-clip, the library's (PATTERN: a wildcard like 'convnext*').

    \b
    Example:
      featcache archs
      featcache archs --timm 'convnext*'
    """
    import fnmatch
    if timm_:
        import timm
        for name in timm.list_models(pattern or "*"):
            click.echo(f"timm/{name}")
        return
    if open_clip:
        from featcache.foundation import import_open_clip
        for name, tag in import_open_clip().list_pretrained():
            if fnmatch.fnmatch(f"{name}.{tag}", pattern or "*"):
                click.echo(f"open_clip/{name}.{tag}")
        return
    from featcache.backbones import ARCHS
    for spec in ARCHS.values():
        if fnmatch.fnmatch(spec.name, pattern or "*"):
            click.echo(f"{spec.name:<18} {spec.feature_dim:>5}-d  {spec.description}")
    if not pattern:
        click.echo(f"{'timm/NAME[.TAG]':<26}any timm model (featcache archs --timm PATTERN)")
        click.echo(f"{'open_clip/MODEL[.TAG]':<26}an open_clip image tower (featcache archs --open-clip PATTERN)")


@main.command()
def datasets():
    """List the data sets.

    \b
    Example:
      featcache datasets
    """
    from featcache.datasets import DATASETS
    for name, loader in DATASETS.items():
        click.echo(f"{name:<18} {loader.__doc__.splitlines()[0]}")


if __name__ == "__main__":
    main()
