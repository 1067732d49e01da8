"""`lt-cls`: Stage 2, classifier strategies on cached features, sweeps and ablation tables."""
from __future__ import annotations

from pathlib import Path

import click

from .common import Group, comma_list, data_options, device_option


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="featcache", prog_name="lt-cls")
def main(debug):
    """Stage 2 of decoupled long-tailed recognition: classifier strategies on cached features."""


@main.command(name="list")
def list_():
    """The registered methods with their parameters and defaults."""
    from classifiers import available
    for entry in available():
        click.echo(f"{entry['name']:<13} {entry['description']}")
        params = ", ".join(f"{k}={v!r}" for k, v in entry["params"].items() if k != "grid")
        click.echo(f"{'':<13} {params}")


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None


@main.command()
@click.option("--cache", "cache_ref", help="Cache entry: a path, key, key prefix or entry name.")
@click.option("--ckpt", type=click.Path(), help="Instead of --cache: get or extract the entry for this checkpoint.")
@click.option("--arch", help="With --ckpt: architecture when the checkpoint does not record it.")
@data_options
@click.option("--cache-dir", type=click.Path(), envvar="FEATCACHE_DIR", help="Cache root.")
@click.option("--methods", help="Comma list of methods (see `lt-cls list`).")
@click.option("--param", "params", multiple=True, metavar="METHOD.KEY=V[,V...]",
              help="Fix or grid a hyper-parameter, e.g. tau.tau=auto or knn.k=10,20,50 (repeat).")
@click.option("--config", type=click.Path(), help="TOML file: methods, seeds, eval_split, val_split, [params.METHOD].")
@click.option("--seeds", help="Comma list of seeds (default 0).")
@click.option("--eval-split", help="Split the table reports (default test).")
@click.option("--val-split", help="Split used for automatic choices such as tau=auto (default val).")
@click.option("--many", type=int, default=100, show_default=True, help="Many-shot: more than this many training images.")
@click.option("--few", type=int, default=20, show_default=True, help="Few-shot: fewer than this many training images.")
@click.option("--out", default="runs/sweep", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "json"]), default="md", show_default=True,
              help="Format of the table printed to stdout.")
@click.option("--resume", is_flag=True, help="Skip runs already recorded in OUT/results.jsonl.")
@click.option("--no-plots", is_flag=True, help="Do not draw the PNG plots.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@device_option
def sweep(cache_ref, ckpt, arch, data_spec, cache_dir, methods, params, config, seeds, eval_split, val_split,
          many, few, out, fmt, resume, no_plots, quiet, device):
    """Run methods x parameters x seeds on one cache entry and print the ablation table.

    Writes OUT/results.jsonl (one record per run, appended as it finishes), OUT/table.md,
    table.csv, table.tex and the plots."""
    from tqdm.auto import tqdm

    from classifiers.sweep import SweepSpec, Sweeper, parse_param_flags, parse_value
    from featcache.store import FeatureCache, cache_root, resolve_entry

    settings = _load_config(config)
    if bool(cache_ref) == bool(ckpt):
        raise click.UsageError("give exactly one of --cache ENTRY or --ckpt CKPT")
    method_list = comma_list([methods]) if methods else list(settings.get("methods", []))
    if not method_list:
        raise click.UsageError("--methods is required (or `methods = [...]` in --config)")
    grid = {m: {k: v if isinstance(v, list) else [v] for k, v in p.items()}
            for m, p in settings.get("params", {}).items()}
    for method, values in parse_param_flags(list(params)).items():
        grid.setdefault(method, {}).update(values)
    seed_list = ([parse_value(s) for s in comma_list([seeds])] if seeds else list(settings.get("seeds", [0])))
    spec = SweepSpec(method_list, grid, [int(s) for s in seed_list], eval_split or settings.get("eval_split", "test"),
                     val_split or settings.get("val_split", "val"), device, many, few)
    if ckpt:
        from featcache.extract import ExtractRequest, extract
        path = extract(ExtractRequest(ckpt, arch, data_spec, cache_dir=cache_dir, device=device, progress=not quiet))
    else:
        path = resolve_entry(cache_ref, cache_root(cache_dir))
    sweeper = Sweeper(FeatureCache.open(path), spec, Path(out), resume=resume)
    with tqdm(total=len(sweeper.runs), initial=len(sweeper.runs) - len(sweeper.pending), unit="run", desc="sweep",
              disable=quiet, dynamic_ncols=True) as bar:
        for record in sweeper:
            bar.set_postfix_str(f"{record['method']} top1 {record['top1']:.1f}")
            bar.update()
    _write_tables(Path(out), fmt)
    if not no_plots:
        from classifiers.plots import plot_sweep
        pictures = plot_sweep(out)
        click.echo(f"plots:   {', '.join(str(p) for p in pictures)}")
    click.echo(f"results: {Path(out) / 'results.jsonl'}")


def _write_tables(out: Path, fmt: str) -> None:
    from classifiers.sweep import load_records
    from classifiers.tables import render

    records = load_records(out / "results.jsonl")
    for name, table_fmt in (("table.md", "md"), ("table.csv", "csv"), ("table.tex", "latex")):
        (out / name).write_text(render(records, table_fmt) + "\n")
    click.echo(render(records, fmt))


@main.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "json"]), default="md", show_default=True)
def table(results, fmt):
    """Print the ablation table of a results.jsonl: seeds as mean ± std, joint first, best marked."""
    from classifiers.sweep import load_records
    from classifiers.tables import render
    click.echo(render(load_records(Path(results)), fmt))


@main.command()
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False))
def plot(results_dir):
    """Draw the paper's pictures from a sweep directory (PNG)."""
    from classifiers.plots import plot_sweep
    for path in plot_sweep(results_dir):
        click.echo(str(path))


if __name__ == "__main__":
    main()
