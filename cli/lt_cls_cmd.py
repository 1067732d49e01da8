"""`lt-cls`: Stage 2, classifier strategies on cached features, sweeps and ablation tables."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from featcache.errors import FeatcacheError

from .common import Group, comma_list, data_options, device_option, trust_checkpoint_option
from .sweep_config import build_executor, executor_options, load_config, parse_param_flags, parse_value

# kept here, not imported, so that --help does not import the classifiers (torch)
DEFAULT_BUDGET = 12
DEFAULT_STACK_MIB = 512  # classifiers.training.DEFAULT_MEMORY_BUDGET
METRIC_CHOICES = ["top1", "accuracy", "top5", "many", "medium", "few", "macro_f1", "ece", "nll"]
SELECTION_CHOICES = METRIC_CHOICES


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="featcache", prog_name="lt-cls")
def main(debug):
    """Stage 2 of decoupled long-tailed recognition: classifier strategies on cached features."""


@main.command(name="list")
def list_():
    """The registered methods with their family, needs, parameters and search space (--tune).

    \b
    Example:
      lt-cls list"""
    from classifiers import available
    for entry in available():
        click.echo(f"{entry['name']:<13} {entry['description']}")
        needs = ["the checkpoint's classifier"] if entry["needs_classifier"] else []
        needs += [f"the val split for {name}='auto'" for name in entry["chosen_on_val"]]
        needed = f"; needs {', '.join(needs)}" if needs else ""
        click.echo(f"{'':<13} {entry['display']} ({entry['family']}){needed}")
        params = ", ".join(f"{k}={v!r}" for k, v in entry["params"].items() if k != "grid")
        click.echo(f"{'':<13} {params}")
        space = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in entry["search_space"].items())
        click.echo(f"{'':<13} --tune searches: {space or 'nothing (one trial)'}")


@main.command()
@click.option("--cache", "cache_refs", multiple=True, metavar="[LABEL=]ENTRY",
              help="Cache entry (path, key, key prefix or name), one per representation; repeat to compare "
                   "representations. LABEL names it in the records (default: the entry's name, else its "
                   "training run, else its key).")
@click.option("--ckpt", type=click.Path(), help="Instead of --cache: get or extract the entry for this checkpoint.")
@click.option("--arch", help="With --ckpt: architecture when the checkpoint does not record it.")
@data_options
@click.option("--cache-dir", type=click.Path(), envvar="FEATCACHE_DIR", help="Cache root.")
@click.option("--methods", help="Comma list of methods (see `lt-cls list`).")
@click.option("--param", "params", multiple=True, metavar="METHOD.KEY=V[,V...]",
              help="Fix or grid a hyper-parameter, e.g. tau.tau=auto or knn.k=10,20,50 (repeat).")
@click.option("--config", type=click.Path(), help="TOML file: methods, seeds, eval_split, val_split, tune, budget, "
                                                  "select_metric, stack, stack_budget, [params.METHOD], [executor] "
                                                  "(docs/cli.md).")
@click.option("--seeds", help="Comma list of seeds (default 0).")
@click.option("--eval-split", help="Split the table reports (default test).")
@click.option("--val-split", help="Split used for automatic choices such as tau=auto (default val).")
@click.option("--tune", is_flag=True, default=None,
              help="Tune every method on the val split: run each method's search space (at most --budget trials; "
                   "--param METHOD.KEY=V fixes a parameter, V1,V2 replaces its values) and report the val-best.")
@click.option("--budget", type=int, help=f"With --tune: trials per method, the same for all (default {DEFAULT_BUDGET}).")
@click.option("--select-metric", type=click.Choice(SELECTION_CHOICES),
              help="With --tune: the val metric the best trial is best at (default top1, balanced top-1; "
                   "ece and nll: lowest).")
@click.option("--no-stack", is_flag=True,
              help="With --tune: fit every trial alone, not a method's trials of one seed in one pass (stacked "
                   "heads; the same results: bit for bit on the CPU). For A/B timing.")
@click.option("--stack-budget", type=click.IntRange(1), metavar="MIB",
              help=f"With --tune: MiB one stack of trials may hold (default {DEFAULT_STACK_MIB}; more trials: "
                   "several stacks).")
@click.option("--many", type=int, default=100, show_default=True, help="Many-shot: more than this many training images.")
@click.option("--few", type=int, default=20, show_default=True, help="Few-shot: fewer than this many training images.")
@click.option("--out", default="runs/sweep", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "json"]), default="md", show_default=True,
              help="Format of the table printed to stdout.")
@click.option("--resume", is_flag=True, help="Add the runs not yet recorded in OUT/results.jsonl.")
@click.option("--overwrite", is_flag=True, help="Start OUT/results.jsonl over (its records are lost).")
@click.option("--no-plots", is_flag=True, help="Do not draw the plots.")
@click.option("--plot-format", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True,
              help="File format of the plots.")
@click.option("--dpi", type=click.IntRange(10, 2400), default=120, show_default=True, help="Resolution of PNG plots.")
@click.option("--no-memory-check", is_flag=True, help="Run even when the estimate says the sweep will not fit in memory.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@executor_options
@trust_checkpoint_option
@device_option
def sweep(cache_refs, ckpt, arch, data_spec, cache_dir, methods, params, config, seeds, eval_split, val_split,
          tune, budget, select_metric, no_stack, stack_budget, many, few, out, fmt, resume, overwrite, no_plots,
          plot_format, dpi, no_memory_check, quiet, executor, trust_checkpoint, device):
    """Run representations x methods x parameters x seeds and print the ablation table.

    Writes OUT/results.jsonl (one record per run, appended as it finishes), OUT/table.md,
    table.csv, table.tex (and grid.* with several representations) and the plots. An OUT that
    already holds records needs --resume or --overwrite.

    \b
    Examples:
      lt-cls sweep --cache ENTRY --methods joint,crt,tau,lws,ncm,knn --param tau.tau=auto --seeds 0,1,2
      lt-cls sweep --cache IB=ENTRY1 --cache CB=ENTRY2 --methods joint,crt,lws --tune --out runs/grid
      lt-cls sweep --cache ENTRY --config sweep.toml

    \b
    A --config file (TOML; flags override it):
      methods = ["joint", "crt", "knn"]
      seeds = [0, 1, 2]
      eval_split = "test"
      val_split = "val"
      tune = false              # true: --tune; then budget = 12, select_metric = "top1",
                                # stack = true, stack_budget = 512 (MiB)
      [params.knn]
      k = [10, 20, 50]          # a list is a grid (or, with tune, the values to search)
      [executor]
      kind = "slurm"            # or "local"
      partition = "gpu"
      time_minutes = 60"""
    from tqdm.auto import tqdm

    from classifiers.cluster import is_lost
    from classifiers.sweep import Representation, SweepSpec, Sweeper, default_label
    from featcache.store import FeatureCache, cache_root

    settings = load_config(config)
    if bool(cache_refs) == bool(ckpt):
        raise FeatcacheError("give --cache ENTRY (one or more) or --ckpt CKPT")
    if resume and overwrite:
        raise FeatcacheError("--resume and --overwrite exclude each other")
    method_list = comma_list([methods]) if methods else settings.get("methods", [])
    if not method_list:
        raise FeatcacheError("--methods is required (or `methods = [...]` in --config)")
    grid = {m: {k: v if isinstance(v, list) else [v] for k, v in p.items()}
            for m, p in settings.get("params", {}).items()}
    for method, values in parse_param_flags(list(params)).items():
        grid.setdefault(method, {}).update(values)
    seed_list = [parse_value(s) for s in comma_list([seeds])] if seeds else settings.get("seeds", [0])
    tune = settings.get("tune", False) if tune is None else tune
    if not tune and (budget is not None or select_metric or "budget" in settings or "select_metric" in settings):
        raise FeatcacheError("--budget and --select-metric apply to a tuned sweep: add --tune")
    no_stack = no_stack or settings.get("stack") is False
    stack_budget = settings.get("stack_budget", DEFAULT_STACK_MIB) if stack_budget is None else stack_budget
    if not tune and (no_stack or "stack" in settings or "stack_budget" in settings or
                     stack_budget != DEFAULT_STACK_MIB):
        raise FeatcacheError("--no-stack and --stack-budget apply to a tuned sweep's trials: add --tune")
    spec = SweepSpec(list(method_list), grid, list(seed_list), eval_split or settings.get("eval_split", "test"),
                     val_split or settings.get("val_split", "val"), device, many, few, tune,
                     settings.get("budget", DEFAULT_BUDGET) if budget is None else budget,
                     select_metric or settings.get("select_metric", "top1"), stack=not no_stack,
                     stack_budget=stack_budget * 2**20)
    if ckpt:
        from featcache.extract import ExtractRequest, extract
        path = extract(ExtractRequest(ckpt=ckpt, arch=arch, data=data_spec, cache_dir=cache_dir, device=device,
                                      progress=not quiet, trust_checkpoint=trust_checkpoint))
        entries = [(None, path)]
    else:
        entries = [_split_label(ref, cache_root(cache_dir)) for ref in cache_refs]
    representations = []
    for label, path in entries:
        cache = FeatureCache.open(path)
        representations.append(Representation(label or default_label(cache), cache))
    sweeper = Sweeper(representations, spec, Path(out), mode="resume" if resume else "overwrite" if overwrite else "new",
                      memory_check=not no_memory_check, executor=build_executor(executor, settings))
    for message in sweeper.notes:
        click.echo(f"note: {message}", err=True)
    lost = 0
    with sweeper, tqdm(total=sweeper.total, initial=sweeper.total - sweeper.remaining, unit="run",
                       desc="sweep", disable=quiet, dynamic_ncols=True) as bar:
        for record in sweeper:
            lost += is_lost(record)
            shown = f"top1 {record['top1']:.1f}" if record["status"] == "ok" else "FAILED"
            chosen = " chosen" if (record.get("tuning") or {}).get("role") == "selected" else ""
            bar.set_postfix_str(f"{record['representation']} {record['method']}{chosen} {shown}")
            bar.update()
            if record["status"] != "ok":
                role = (record.get("tuning") or {}).get("role")
                what = {"trial": " trial", "selected": " (tuned)"}.get(role, "")
                bar.write(f"warning: {record['representation']} {record['method']}{what} seed {record['seed']}: "
                          f"{record['failure']}", file=sys.stderr)
        _write_tables(Path(out), fmt, sweeper.records)
    if not no_plots:
        from classifiers.plots import plot_sweep
        pictures = plot_sweep(out, sweeper.records, plot_format, dpi)
        click.echo(f"plots:   {', '.join(str(p) for p in pictures)}")
    click.echo(f"results: {Path(out) / 'results.jsonl'}")
    if lost:
        raise FeatcacheError(f"{lost} run(s) failed because their SLURM task ended first (their failed records in "
                             f"{Path(out) / 'results.jsonl'} name the job and its log); the same command with "
                             "--resume runs them again")


def _split_label(ref: str, root: Path):
    """``LABEL=ENTRY`` -> (LABEL, entry path); a plain ENTRY -> (None, entry path)."""
    from featcache.store import resolve_entry
    label, sep, entry = ref.partition("=")
    if sep and label and "/" not in label:
        if not entry:
            raise FeatcacheError(f"--cache {ref!r}: expected LABEL=ENTRY")
        return label, resolve_entry(entry, root)
    return None, resolve_entry(ref, root)


def _write_tables(out: Path, fmt: str, records: list[dict]) -> None:
    """OUT/table.* (and grid.* with several representations) from the sweep's records, aggregated
    once; the table in ``fmt`` to stdout."""
    from classifiers.tables import aggregate, render_grid, render_rows

    rows = aggregate(records)
    outputs = {f"table.{ext}": render_rows(rows, kind) for kind, ext in _TABLE_FILES}
    if len({r.representation for r in rows}) > 1:
        outputs.update({f"grid.{ext}": render_grid(rows, kind) for kind, ext in _TABLE_FILES})
    try:
        for name, text in outputs.items():
            (out / name).write_text(text + "\n")
    except OSError as exc:
        raise FeatcacheError(f"cannot write the tables into {out}: {exc.strerror or exc}") from None
    shown = dict(_TABLE_FILES).get(fmt)
    click.echo(outputs[f"table.{shown}"] if shown else render_rows(rows, fmt))


_TABLE_FILES = (("md", "md"), ("csv", "csv"), ("latex", "tex"))


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "json"]), default="md", show_default=True)
@click.option("--layout", type=click.Choice(["rows", "grid"]), default="rows", show_default=True,
              help="rows: one row per representation x method; grid: representations x methods, one metric.")
@click.option("--metrics", help="Comma list of metrics: the columns of rows (default many,medium,few,top1), "
                                "one grid each (default top1); any of " + ", ".join(METRIC_CHOICES) + ".")
@click.option("--metric", type=click.Choice(METRIC_CHOICES), help="Same as --metrics with one metric.")
@click.option("--trials", is_flag=True, help="A tuned sweep: show every trial, not only each method's choice.")
@click.option("--caption", help="LaTeX: put the tabular in a table environment with this caption.")
@click.option("--label", help="LaTeX: the table's \\label.")
def table(results, fmt, layout, metrics, metric, trials, caption, label):
    """Print the ablation table of one or more results.jsonl files or sweep directories (merged):
    seeds as mean ± std, joint first, best marked (ECE and NLL: lowest).

    \b
    Example:
      lt-cls table runs/sweep --metrics top1,few,ece,nll
      lt-cls table runs/a runs/b --layout grid --metrics top1,few --format latex --caption "Top-1" --label tab:grid"""
    from classifiers.records import RESULTS_FILE, load_records
    from classifiers.tables import merge_records, render

    sources = []
    for item in results:
        path = Path(item)
        if path.is_dir():
            path = path / RESULTS_FILE
            if not path.is_file():
                raise FeatcacheError(f"{item} is a directory without {RESULTS_FILE}")
        sources.append(load_records(path))
    if metrics and metric:
        raise FeatcacheError("give --metrics or --metric, not both")
    chosen = comma_list([metrics]) if metrics else [metric] if metric else None
    click.echo(render(merge_records(sources), fmt, layout, chosen, trials=trials, caption=caption, label=label))


@main.command()
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True)
@click.option("--dpi", type=click.IntRange(10, 2400), default=120, show_default=True, help="Resolution of PNG plots.")
def plot(results_dir, fmt, dpi):
    """Draw the paper's pictures from a sweep directory: weight norms, the tau curve, per-class
    accuracy, reliability diagrams and, with several representations, the representation x
    classifier bars.

    \b
    Example:
      lt-cls plot runs/sweep --format pdf"""
    from classifiers.plots import plot_sweep
    for path in plot_sweep(results_dir, fmt=fmt, dpi=dpi):
        click.echo(str(path))


if __name__ == "__main__":
    main()
