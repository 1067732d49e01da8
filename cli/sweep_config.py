"""`lt-cls sweep` settings from its flags and its TOML file (``--config``)."""
from __future__ import annotations

import functools

import click

from featcache.errors import FeatcacheError

from .common import comma_list


def parse_value(text: str):
    """'1' -> 1, '0.5' -> 0.5, 'true' -> True, anything else stays a string (e.g. 'auto')."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_param_flags(flags: list[str]) -> dict[str, dict[str, list]]:
    """``METHOD.KEY=V[,V...]`` flags -> {method: {key: [values]}}."""
    out: dict[str, dict[str, list]] = {}
    for flag in flags:
        target, sep, values = flag.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key or not values:
            raise FeatcacheError(f"--param {flag!r}: expected METHOD.KEY=VALUE[,VALUE...] (e.g. tau.tau=1.0)")
        out.setdefault(method.strip(), {})[key.strip()] = [parse_value(v) for v in values.split(",")]
    return out


def load_config(path: str | None) -> dict:
    """The settings of a ``--config`` TOML file (none: ``{}``), checked: methods a list of names,
    seeds a list, splits names, params tables ``[params.METHOD]``."""
    if not path:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            settings = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"--config {path}: {exc}") from None
    unknown = sorted(set(settings) - {"methods", "seeds", "eval_split", "val_split", "params", "executor", "tune",
                                      "budget", "select_metric", "stack", "stack_budget"})
    if unknown:
        raise FeatcacheError(f"--config {path}: unknown key {unknown[0]!r} (known: methods, seeds, eval_split, "
                             "val_split, tune, budget, select_metric, stack, stack_budget, [params.METHOD], [executor])")
    if "stack" in settings and not isinstance(settings["stack"], bool):
        raise FeatcacheError(f"--config {path}: stack must be true or false")
    if "stack_budget" in settings and (isinstance(settings["stack_budget"], bool) or
                                       not isinstance(settings["stack_budget"], int) or settings["stack_budget"] < 1):
        raise FeatcacheError(f"--config {path}: stack_budget must be a positive integer (MiB)")
    if "tune" in settings and not isinstance(settings["tune"], bool):
        raise FeatcacheError(f"--config {path}: tune must be true or false")
    if "budget" in settings and (isinstance(settings["budget"], bool) or not isinstance(settings["budget"], int)):
        raise FeatcacheError(f"--config {path}: budget must be an integer (trials per method)")
    if "select_metric" in settings and not isinstance(settings["select_metric"], str):
        raise FeatcacheError(f"--config {path}: select_metric must be a metric name")
    executor = settings.get("executor", {})
    if not isinstance(executor, dict):
        raise FeatcacheError(f"--config {path}: executor must be a table [executor] (kind = \"slurm\", ...)")
    wrong = sorted(set(executor) - {"kind", *EXECUTOR_FIELDS})
    if wrong:
        raise FeatcacheError(f"--config {path}: [executor] has no {wrong[0]!r} (known: kind, "
                             f"{', '.join(EXECUTOR_FIELDS)})")
    methods = settings.get("methods", [])
    if isinstance(methods, str):  # methods = "crt,tau" reads as the comma list it looks like
        settings["methods"] = comma_list([methods])
    elif not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
        raise FeatcacheError(f"--config {path}: methods must be a list of method names")
    seeds = settings.get("seeds", [0])
    settings["seeds"] = seeds if isinstance(seeds, list) else [seeds]
    for key in ("eval_split", "val_split"):
        if key in settings and not isinstance(settings[key], str):
            raise FeatcacheError(f"--config {path}: {key} must be a split name")
    params = settings.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise FeatcacheError(f"--config {path}: params must be tables [params.METHOD] of name = value(s)")
    for method, values in params.items():
        for name, value in values.items():
            if value == []:
                raise FeatcacheError(f"--config {path}: [params.{method}] {name} = []: an empty grid (give at "
                                     "least one value)")
            if isinstance(value, dict):
                raise FeatcacheError(f"--config {path}: [params.{method}] {name} is a table; give a value or a "
                                     "list of values")
    return settings


EXECUTOR_FIELDS = ("partition", "time_minutes", "cpus_per_task", "gpus_per_task", "array_parallelism",
                   "runs_per_task", "mem_gb")


def executor_options(func):
    """--executor and the SLURM settings (each overrides the TOML [executor] table)."""
    options = [
        click.option("--executor", type=click.Choice(["local", "slurm"]), default=None,
                     help="Where the runs go: here (local, the default) or a SLURM job array through submitit."),
        click.option("--slurm-partition", help="SLURM partition (default: the cluster's)."),
        click.option("--slurm-time", "slurm_time_minutes", type=int, help="Time limit of each task, minutes (60)."),
        click.option("--slurm-cpus-per-task", type=int, help="CPUs of each task (2)."),
        click.option("--slurm-gpus-per-task", type=int, help="GPUs of each task (0)."),
        click.option("--slurm-array-parallelism", type=int, help="Tasks running at a time (64)."),
        click.option("--slurm-runs-per-task", type=int, help="Runs packed into one task (50)."),
        click.option("--slurm-mem-gb", type=float, help="Memory of each task, GiB (the partition's default)."),
    ]

    @functools.wraps(func)  # keeps the options already attached to func
    def collect(**kwargs):
        given = {name: kwargs.pop(f"slurm_{name}") for name in EXECUTOR_FIELDS}
        kwargs["executor"] = {"kind": kwargs.pop("executor"), **{k: v for k, v in given.items() if v is not None}}
        return func(**kwargs)
    for option in reversed(options):
        collect = option(collect)
    return collect


def build_executor(flags: dict, settings: dict):
    """None for the local executor, else the SlurmExecutor of the TOML [executor] table overridden
    by the --slurm-* flags."""
    table = {**settings.get("executor", {}), **{k: v for k, v in flags.items() if v is not None}}
    kind = table.pop("kind", None) or "local"
    if kind == "local":
        if table:
            raise FeatcacheError(f"--slurm-{next(iter(table)).replace('_', '-')} needs --executor slurm")
        return None
    if kind != "slurm":
        raise FeatcacheError(f"[executor] kind = {kind!r}: choose local or slurm")
    from classifiers.cluster import SlurmExecutor
    return SlurmExecutor(**table)
