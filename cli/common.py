"""What both entry points share: one-line errors, and the data-set options."""
from __future__ import annotations

import functools
import os
import signal
import sys

import click

from featcache.errors import FeatcacheError


class Group(click.Group):
    """A click group that prints a user error as one line (exit 1); ``--debug`` shows the traceback."""

    def parse_args(self, ctx, args):
        try:  # the group's own --help / --version print while parsing
            return super().parse_args(ctx, args)
        except BrokenPipeError as exc:
            if exc.filename is not None:
                raise
            _stdout_closed()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except MemoryError:
            if ctx.params.get("debug"):
                raise
            click.echo(f"Error: out of memory{_memory_hint(self, ctx)}", err=True)
            sys.exit(1)
        except BrokenPipeError as exc:
            if exc.filename is not None or ctx.params.get("debug"):
                raise
            _stdout_closed()
        except OSError as exc:  # the environment (disk full, permissions) where no FeatcacheError was raised
            if ctx.params.get("debug"):
                raise
            where = f" {exc.filename}" if exc.filename else ""
            click.echo(f"Error: cannot access{where}: {exc.strerror or exc}", err=True)
            sys.exit(1)


def _stdout_closed() -> None:
    """The reader of stdout went away (``lt-cls list | head -1``): normal, not an error. Nothing
    more is written; the exit status is the shell's for a command ended by SIGPIPE (128 + 13), as
    for any Unix tool whose output stopped being read."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
    except (OSError, ValueError):
        pass
    sys.exit(128 + signal.SIGPIPE)


def _memory_hint(group: click.Group, ctx) -> str:
    """Suggest the memory options the failed command actually has."""
    command = group.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
    names = {param.name for param in command.params} if command else set()
    hints = [hint for name, hint in (("batch_size", "lower --batch-size"), ("dtype", "use --dtype float16"))
             if name in names]
    return f" ({', or '.join(hints)})" if hints else ""


def comma_list(values) -> list[str]:
    """``--x a,b --x c`` -> [a, b, c]."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def key_value(values, option: str) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise FeatcacheError(f"{option} {value!r}: expected NAME=VALUE")
        key, _, val = value.partition("=")
        out[key.strip()] = val.strip()
    return out


def data_options(func=None, *, required: bool = False):
    """--data and its options; only the ones given are passed on (a checkpoint's recorded data
    options fill in the rest). ``@data_options(required=True)`` marks --data required."""
    if func is None:
        return functools.partial(data_options, required=required)
    data_help = ("Data set: digits-lt, fashion-mnist-lt, mnist-lt, cifar10-lt, cifar100-lt, imagefolder, txt"
                 + ("." if required else "; default: the one a `featcache train` checkpoint records "
                    "(required for any other checkpoint)."))
    options = [
        click.option("--data", "data_name", required=required, help=data_help),
        click.option("--data-root", type=click.Path(), help="Where the data set's files are (digits-lt: none, "
                     "built in; fashion-mnist-lt: default /usr/share/datasets/fashion-mnist; the others: required)."),
        click.option("--list", "lists", multiple=True, metavar="SPLIT=FILE",
                     help="txt data: a list file per split (repeat)."),
        click.option("--imbalance", type=float, help="Max/min class-count ratio (generated data sets; default: "
                     "digits-lt 30, the others 100)."),
        click.option("--max-per-class", type=int, help="Training images of the largest class (default: digits-lt "
                     "120, cifar100-lt 500, the others 5000)."),
        click.option("--profile", type=click.Choice(["exp", "step"]), help="Long-tail profile (default exp)."),
        click.option("--class-order", type=click.Choice(["natural", "shuffled"]),
                     help="Which classes become the head (default natural: class 0 largest)."),
        click.option("--order-seed", type=int, help="Seed of the shuffled class order (default 0)."),
        click.option("--val-per-class", type=int, help="Balanced val images per class, from unused train images "
                     "(default: digits-lt 10, cifar100-lt 0, the others 20)."),
        click.option("--resize", type=int, help="Eval resize of the shorter side: image files (default 256); "
                     "timm / open_clip backbones on any data (default: theirs)."),
        click.option("--crop", type=int, help="Eval center-crop size: image files (default 224); "
                     "timm / open_clip backbones on any data (default: theirs)."),
        click.option("--hash-images", is_flag=True, default=None,
                     help="imagefolder / txt: key the cache on each image's SHA-256 instead of its size "
                          "and mtime (reads every image once more)."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        keys = ("data_name", "data_root", "lists", "imbalance", "max_per_class", "profile",
                "class_order", "order_seed", "val_per_class", "resize", "crop", "hash_images")
        raw = {k: kwargs.pop(k) for k in keys}
        raw["hash_images"] = raw["hash_images"] or None  # passed on only when given
        kwargs["data_spec"] = build_data_spec(raw)
        return func(*args, **kwargs)
    return wrapper


def build_data_spec(raw: dict):
    """The DataSpec of the given flags, refused (one line) if the data set does not declare one of them."""
    from featcache.datasets import DATASETS, FILE_DATASETS, DataSpec, dataset_options
    name = raw.pop("data_name")
    root = raw.pop("data_root")
    lists = key_value(raw.pop("lists"), "--list")
    options = {k: v for k, v in raw.items() if v is not None}
    if lists:
        options["lists"] = lists
    if name is None:
        if root or options:
            raise FeatcacheError("data options were given without --data")
        return None
    if name not in DATASETS:
        raise FeatcacheError(f"unknown --data {name!r}; choose one of {', '.join(DATASETS)}")
    if options.get("hash_images") and name not in FILE_DATASETS:
        raise FeatcacheError(f"--hash-images applies to {' / '.join(FILE_DATASETS)} data, not --data {name}")
    dataset_options(name, options)  # before a checkpoint or the data is read
    return DataSpec(name, root, options)


def device_option(func):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present), cpu or cuda.")(func)


def trust_checkpoint_option(func):
    return click.option("--trust-checkpoint", is_flag=True,
                        help="Load a checkpoint that needs full unpickling (it can run code: only for files "
                             "you trust). Default: weights only, numpy scalars allowed.")(func)
