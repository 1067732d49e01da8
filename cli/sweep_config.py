"""`lt-cls sweep` settings from its flags and its TOML file (``--config``)."""
from __future__ import annotations

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
    unknown = sorted(set(settings) - {"methods", "seeds", "eval_split", "val_split", "params"})
    if unknown:
        raise FeatcacheError(f"--config {path}: unknown key {unknown[0]!r} (known: methods, seeds, eval_split, "
                             "val_split, [params.METHOD])")
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
    return settings
