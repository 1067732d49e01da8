"""Ablation tables from sweep records. Tables pivot records; they never recompute.

Records are grouped by everything but the seed (representation, eval split, shot thresholds,
method, requested parameters); a group's seeds are aggregated as mean ± sample std. One label may
cover several cache entries only as seeds (a backbone per seed): where two entries of a group
share a seed, the group is split by entry (its rows name the key).
A group with a failed run (non-finite logits) shows ``failed`` and is never marked best.

Layouts: ``rows`` (one row per representation x method + parameters, sorted by the methods'
registered family, then registration order: the paper's first, joint first; a Representation
column when there are several; one column per metric, Many / Medium / Few / All by default) and
``grid`` (one row per representation, one column per method, one metric; the best cell of each
row and of each column marked). Any recorded metric can be shown (:data:`METRIC_HEADERS`); the
best cell is the highest, or the lowest for ECE and NLL.

A tuned sweep's rows are its choices (one per method, with the chosen values in the label and the
budget under the table); its trials are left out unless asked for (``trials=True``). An empty
shot group is shown as ``empty`` and said under the table."""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field

import numpy as np

from featcache.errors import FeatcacheError

from .base import FAMILIES, REGISTRY, display_name
from .records import IDENTITY_FIELDS, METRIC_FIELDS, gc_paused, param_items, record_key, requested_params, tuning_role

METRIC_HEADERS = {"many": "Many", "medium": "Medium", "few": "Few", "top1": "All", "accuracy": "Acc",
                  "top5": "Top-5", "macro_f1": "Macro-F1", "ece": "ECE", "nll": "NLL"}
DEFAULT_METRICS = ("many", "medium", "few", "top1")
LOWER_IS_BETTER = frozenset({"ece", "nll"})
METRICS_RENAMED = {"top1": "all"}  # CSV column names: all_mean, as before --metrics
SHOT_GROUPS = ("many", "medium", "few")
FORMATS = ("md", "csv", "latex", "json")
LAYOUTS = ("rows", "grid")


@dataclass
class Row:
    label: str  # method and parameters, as shown
    method: str
    seeds: int
    stats: dict  # metric -> (mean, std) or None
    representation: str = ""
    context: str = ""  # eval split / shot thresholds, when they differ between rows
    failed: int = 0  # runs of the group that failed
    requested: str = ""  # method and requested parameters, without values chosen on val (grid columns)
    shots: tuple = (100, 20)  # the (many, few) thresholds
    sizes: dict = field(default_factory=dict)  # shot group -> classes it averaged (the most over seeds)
    tuning: dict | None = None  # a tuned method: metric, budget, trials, val split
    eval_split: str = "test"


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _label(method: str, params: dict, chosen: dict, defaults: dict | None = None, gridded: frozenset = frozenset(),
           prefix: str = "") -> str:
    """The method's display name and the parameters that set the row apart: those off their
    default, and those gridded among the method's rows (shown at every value, the default too)."""
    if defaults is None:
        defaults = REGISTRY[method].defaults() if method in REGISTRY else {}
    shown = []
    for key, value in sorted(params.items()):
        if key in ("seed", "device") or key not in gridded and (defaults.get(key) == value or (
                isinstance(value, list) and list(defaults.get(key, ())) == value)):
            continue
        text = f"{key}={value}"
        if value == "auto" and key in chosen:
            text += f": {np.mean(chosen[key]):.2g}"
        shown.append(text)
    name = display_name(method)
    inner = (prefix + ", ".join(shown)) if shown else prefix.rstrip(": ")
    return f"{name} ({inner})" if inner else name


def _tuned_label(method: str, chosen: dict) -> str:
    """A tuned method's label: the value chosen for each searched parameter, per seed where the
    seeds chose differently (``lr=0.05/0.2``)."""
    if not chosen:
        return display_name(method)
    parts = []
    for name, values in chosen.items():
        distinct = list(dict.fromkeys(_value(v) for v in values))
        parts.append(f"{name}={distinct[0] if len(distinct) == 1 else '/'.join(_value(v) for v in values)}")
    return f"{display_name(method)} (tuned: {', '.join(parts)})"


def merge_records(sources: list[list[dict]]) -> list[dict]:
    """Records of several results files as one list; a run recorded twice is kept once (said once)."""
    seen, merged, repeated = set(), [], 0
    with gc_paused():
        for records in sources:
            for record in records:
                key = record_key(record)
                if key in seen:
                    repeated += 1
                    continue
                seen.add(key)
                merged.append(record)
    if repeated:
        print(f"note: {repeated} record(s) appear in more than one results file; each is counted once",
              file=sys.stderr)
    return merged


def aggregate(records: list[dict], trials: bool = False) -> list[Row]:
    """The table's rows: one pass over the records groups them (one key per record), then each group
    is summarised. A tuned sweep's trials are left out unless ``trials``."""
    if not trials:
        records = [r for r in records if tuning_role(r) != "trial"]
    if not records:
        raise FeatcacheError("no records to tabulate")
    with gc_paused():
        groups = _groups(records)
    representations = dict.fromkeys(r["representation"] for r in records)
    parts = {(key, entry): members for key, (_, group) in groups.items() for entry, members in _by_entry(group)}
    # an identity field varies when two groups differ in it (every record is in a group)
    varying = {f for i, f in enumerate(IDENTITY_FIELDS) if len({key[0][i] for key in groups}) > 1}
    order = {name: (FAMILIES.index(cls.info.family), i) for i, (name, cls) in enumerate(REGISTRY.items())}
    unregistered = (len(FAMILIES), 0)
    position = {rep: i for i, rep in enumerate(representations)}
    defaults = {name: cls.defaults() for name, cls in REGISTRY.items()}
    gridded = _gridded(groups)
    rows = []
    for (group_key, entry), members in parts.items():
        identity, method, _, role = group_key
        role = role[0] if isinstance(role, tuple) else role  # "selected" (metric and budget aside), "trial", None
        params = groups[group_key][0]
        fields = dict(zip(IDENTITY_FIELDS, identity))
        chosen = {}
        for record in members:
            if record.get("selected_on") and method in REGISTRY and role is None:
                for name in REGISTRY[method].info.chosen_on_val:
                    chosen.setdefault(name, []).append(record["params"][name])
        failed = sum(r.get("status") != "ok" for r in members)
        stats = {}
        for column in METRIC_HEADERS:
            values = [r[column] for r in members if r.get(column) is not None]
            stats[column] = None if failed or not values else (
                float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        context = []
        if "eval_split" in varying:
            context.append(f"eval {fields['eval_split']}")
        if "many_threshold" in varying or "few_threshold" in varying:
            context.append(f">{fields['many_threshold']}/<{fields['few_threshold']}")
        if entry:
            context.append(f"entry {entry[:8]}")
        method_defaults = defaults.get(method, {})
        sizes = {g: max((r[f"n_{g}"] for r in members if r.get(f"n_{g}") is not None), default=None)
                 for g in SHOT_GROUPS}
        tuning = None
        if role == "selected":
            first = members[0]["tuning"]
            tuning = {"metric": first["metric"], "budget": first["budget"], "val_split": members[0]["selected_on"],
                      "trials": max(r["tuning"]["trials"] for r in members)}
            picked = {}
            for record in members:
                for name, value in record["tuning"]["chosen"].items():
                    picked.setdefault(name, []).append(value)
            label = _tuned_label(method, picked)
            requested = display_name(method) + (" (tuned)" if picked else "")
        else:
            prefix = "trial: " if role == "trial" else ""
            label = _label(method, params, chosen, method_defaults, gridded.get(method, frozenset()), prefix)
            requested = _label(method, params, {}, method_defaults, gridded.get(method, frozenset()), prefix)
        rows.append(Row(label, method, len(members), stats, fields["representation"], ", ".join(context), failed,
                        requested, (fields["many_threshold"], fields["few_threshold"]), sizes, tuning,
                        fields["eval_split"]))
    rows.sort(key=lambda r: (position[r.representation], r.context, order.get(r.method, unregistered),
                             r.tuning is None, r.label))
    return rows


def _gridded(groups: dict) -> dict[str, frozenset]:
    """Per method, the parameters whose requested value differs between its groups (a grid)."""
    values: dict[str, dict[str, set]] = {}
    for (_, method, _, role), (params, _) in groups.items():
        if isinstance(role, tuple):  # a tuned method's choice: no requested parameters
            continue
        for name, value in params.items():
            values.setdefault(method, {}).setdefault(name, set()).add(repr(value))
    return {method: frozenset(n for n, seen in by_name.items() if len(seen) > 1) for method, by_name in values.items()}


def _groups(records: list[dict]) -> dict[tuple, tuple[dict, list[dict]]]:
    """Records by everything but the seed: key -> (requested parameters, records), in first-seen
    order; a key's last part is the record's tuning role (None, "trial", or a choice's
    ("selected", metric, budget))."""
    groups: dict[tuple, tuple[dict, list[dict]]] = {}
    for record in records:
        params = requested_params(record)
        params.pop("seed", None)
        tuning = record.get("tuning")
        role = None if not tuning else "trial" if tuning["role"] == "trial" else \
            ("selected", tuning["metric"], tuning["budget"])
        key = (tuple(record.get(f) for f in IDENTITY_FIELDS), record["method"], param_items(params), role)
        group = groups.get(key)
        if group is None:
            groups[key] = (params, [record])
        else:
            group[1].append(record)
    return groups


def _by_entry(group: list[dict]) -> list[tuple[str, list[dict]]]:
    """The group whole when its seeds are distinct, else one part per cache entry."""
    seeds = [r["seed"] for r in group]
    if len(seeds) == len(set(seeds)):
        return [("", group)]
    entries: dict[str, list[dict]] = {}
    for record in group:
        entries.setdefault(record["cache_key"], []).append(record)
    return list(entries.items())


def _best(rows: list[Row], column: str) -> float | None:
    means = [r.stats[column][0] for r in rows if r.stats[column] is not None]
    if not means:
        return None
    return min(means) if column in LOWER_IS_BETTER else max(means)


def _number(column: str, value: float) -> str:
    return f"{value:.3f}" if column == "nll" else f"{value:.1f}"


def _cell(row: Row, column: str, bold: bool, fmt: str, mark: str = "") -> str:
    if row.failed:
        return f"failed ({row.failed}/{row.seeds})" if row.seeds > 1 else "failed"
    stat = row.stats[column]
    if stat is None:
        return "empty" if column in SHOT_GROUPS and row.sizes.get(column) == 0 else "-"
    mean, std = (_number(column, v) for v in stat)
    if fmt == "latex":
        text = f"{mean} \\pm {std}" if row.seeds > 1 else mean
        text = f"\\mathbf{{{text}}}" if bold else text
        return f"\\underline{{${text}$}}" if mark else f"${text}$"
    text = f"{mean} ± {std}" if row.seeds > 1 else mean
    return (f"**{text}**" if bold else text) + mark


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"),
                       ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, repl)
    return text.replace("tau", r"$\tau$")


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_HEADERS]
    if unknown or not metrics:
        raise FeatcacheError(f"--metrics {','.join(metrics)!r}: choose from {', '.join(METRIC_HEADERS)}")
    return metrics


def _header(rows: list[Row], column: str) -> str:
    """The metric's column header; a shot group's names its thresholds where the rows share them."""
    name = METRIC_HEADERS[column]
    shots = {r.shots for r in rows}
    if column not in SHOT_GROUPS or len(shots) != 1:
        return name + (" (%)" if column == "ece" else "")
    many, few = shots.pop()
    return f"{name} ({'>' + str(many) if column == 'many' else '<' + str(few) if column == 'few' else f'{few}-{many}'})"


def notes(rows: list[Row], metrics=DEFAULT_METRICS) -> list[str]:
    """What a reader of the table must know: the shot groups that are empty, and for tuned rows
    the selection rule and the one trial budget."""
    said = []
    for group in (m for m in _check_metrics(metrics) if m in SHOT_GROUPS):
        empty = [r for r in rows if r.sizes.get(group) == 0]
        if not empty:
            continue
        many, few = empty[0].shots
        which = {"many": f"more than {many}", "medium": f"{few} to {many}", "few": f"fewer than {few}"}[group]
        where = "" if len(empty) == len(rows) else f" (in {len(empty)} of the {len(rows)} rows)"
        said.append(f"{METRIC_HEADERS[group]}: empty{where}: no class of the {empty[0].eval_split} split has {which} "
                    f"training images (--many / --few set the thresholds)")
    tuned = [r for r in rows if r.tuning]
    if tuned:
        rules = sorted({(r.tuning["metric"], r.tuning["budget"], r.tuning["val_split"]) for r in tuned})
        trials = ", ".join(f"{display_name(m)} {n}" for m, n in
                           dict.fromkeys((r.method, r.tuning["trials"]) for r in tuned))
        for metric, budget, val_split in rules:
            said.append(f"Tuned on val: each method's trial with the best {_metric_name(metric)} on the {val_split!r} "
                        f"split, with the same budget for every method: at most {budget} trials (fewer where its "
                        f"search space is smaller). Trials: {trials}. The test split never influenced a choice.")
    return said


def _metric_name(metric: str) -> str:
    return "balanced top-1" if metric == "top1" else METRIC_HEADERS[metric]


def _latex_table(headers: list[str], body: list[list[str]], numeric_from: int, caption: str | None,
                 label: str | None, comments: list[str]) -> str:
    """A booktabs tabular (text columns left-aligned, numbers right-aligned), in a ``table``
    environment when there is a caption or a label; ``comments`` as LaTeX comments after it."""
    spec = "l" * numeric_from + "r" * (len(headers) - numeric_from)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(row) + " \\\\" for row in body]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption is not None or label is not None:
        inner = ["\\centering"] + ([f"\\caption{{{_latex_escape(caption)}}}"] if caption is not None else []) \
            + ([f"\\label{{{label}}}"] if label is not None else [])
        lines = ["\\begin{table}[t]"] + inner + lines + ["\\end{table}"]
    return "\n".join(lines + [f"% {c}" for c in comments])


def render(records: list[dict], fmt: str = "md", layout: str = "rows", metrics=None, *, trials: bool = False,
           caption: str | None = None, label: str | None = None) -> str:
    """The table of sweep records as Markdown, CSV, a LaTeX tabular, or JSON. ``metrics``: the
    columns of ``rows`` (default Many / Medium / Few / All), or the metric(s) of ``grid`` (one grid
    per metric; default top1)."""
    if layout not in LAYOUTS:
        raise FeatcacheError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    rows = aggregate(records, trials)
    if layout == "rows":
        return render_rows(rows, fmt, metrics or DEFAULT_METRICS, caption, label)
    grids = [render_grid(rows, fmt, metric, caption, label) for metric in _check_metrics(metrics or "top1")]
    return "[" + ",\n".join(grids) + "]" if fmt == "json" and len(grids) > 1 else "\n\n".join(grids)


def render_rows(rows: list[Row], fmt: str = "md", metrics=DEFAULT_METRICS, caption: str | None = None,
                label: str | None = None) -> str:
    """Aggregated rows (see :func:`aggregate`; labels may be changed) as a table, one column per metric."""
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    columns = _check_metrics(metrics)
    best = {c: _best(rows, c) for c in columns}
    is_best = {(id(r), c): r.stats[c] is not None and r.stats[c][0] == best[c] for r in rows for c in columns}
    several = len({r.representation for r in rows}) > 1
    context = any(r.context for r in rows)
    if fmt == "json":
        return json.dumps([{"representation": r.representation, "context": r.context, "method": r.method,
                            "label": r.label, "seeds": r.seeds, "failed": r.failed, "tuning": r.tuning,
                            "group_sizes": r.sizes,
                            **{c: None if r.stats[c] is None else {"mean": r.stats[c][0], "std": r.stats[c][1],
                                                                  "best": is_best[(id(r), c)]}
                               for c in columns}} for r in rows], indent=1)
    lead = (["Representation"] if several else []) + (["Setting"] if context else [])

    def leading(r: Row) -> list[str]:
        return ([r.representation] if several else []) + ([r.context] if context else [])

    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([h.lower() for h in lead] + ["method", "seeds", "failed"]
                        + [f"{METRICS_RENAMED.get(c, c)}_{s}" for c in columns for s in ("mean", "std")])
        for r in rows:
            writer.writerow(leading(r) + [r.label, r.seeds, r.failed]
                            + [("" if r.stats[c] is None else f"{r.stats[c][i]:.4f}") for c in columns for i in (0, 1)])
        return buffer.getvalue().rstrip("\n")
    escape = (lambda t: t) if fmt == "md" else _latex_escape
    headers = lead + ["Method", "Seeds"] + [_header(rows, c) for c in columns]
    body = [[escape(t) for t in leading(r)] + [escape(r.label), str(r.seeds)]
            + [_cell(r, c, is_best[(id(r), c)], fmt) for c in columns] for r in rows]
    said = notes(rows, columns)
    if fmt == "latex":
        return _latex_table([escape(h) for h in headers], body, len(lead) + 1, caption, label, said)
    from tabulate import tabulate
    table = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=["left"] * (len(lead) + 1) + ["right"] * (len(columns) + 1))
    return table + "".join(f"\n\n{note}" for note in said)



def render_grid(rows: list[Row], fmt: str = "md", metric: str = "top1", caption: str | None = None,
                label: str | None = None) -> str:
    """One row per representation, one column per method (+ parameters): ``metric`` as mean ± std.
    Marked: the best cell of each row (bold) and of each column (†; underlined in LaTeX)."""
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if metric not in METRIC_HEADERS:
        raise FeatcacheError(f"--metric {metric!r}: choose one of {', '.join(METRIC_HEADERS)}")
    if any(r.context for r in rows):
        raise FeatcacheError("--layout grid needs records of one eval split and one set of shot thresholds "
                             f"(these differ: {sorted({r.context for r in rows})}); tabulate them separately")
    representations = list(dict.fromkeys(r.representation for r in rows))
    methods = list(dict.fromkeys(r.requested for r in rows))
    cells = {(r.representation, r.requested): r for r in rows}
    row_best = {rep: _best([cells[rep, m] for m in methods if (rep, m) in cells], metric) for rep in representations}
    col_best = {m: _best([cells[rep, m] for rep in representations if (rep, m) in cells], metric) for m in methods}

    def flags(rep, method):
        row = cells.get((rep, method))
        value = None if row is None or row.stats[metric] is None else row.stats[metric][0]
        return row, value is not None and value == row_best[rep], value is not None and value == col_best[method]

    if fmt == "json":
        return json.dumps({"metric": metric, "rows": [
            {"representation": rep, "cells": {m: None if (row := cells.get((rep, m))) is None else {
                "mean": None if row.stats[metric] is None else row.stats[metric][0],
                "std": None if row.stats[metric] is None else row.stats[metric][1],
                "seeds": row.seeds, "failed": row.failed, "label": row.label,
                "best_in_row": flags(rep, m)[1], "best_in_column": flags(rep, m)[2]} for m in methods}}
            for rep in representations]}, indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["representation"] + [f"{m} {s}" for m in methods for s in ("mean", "std")])
        for rep in representations:
            values = []
            for m in methods:
                row = cells.get((rep, m))
                if row is not None and row.failed:
                    values += ["failed", "failed"]
                elif row is None or row.stats[metric] is None:
                    values += ["", ""]
                else:
                    values += [f"{row.stats[metric][0]:.4f}", f"{row.stats[metric][1]:.4f}"]
            writer.writerow([rep] + values)
        return buffer.getvalue().rstrip("\n")
    escape = (lambda t: t) if fmt == "md" else _latex_escape
    body = []
    for rep in representations:
        line = [escape(rep)]
        for m in methods:
            row, in_row, in_column = flags(rep, m)
            line.append("-" if row is None else _cell(row, metric, in_row, fmt, ("†" if fmt == "md" else "u") if in_column else ""))
        body.append(line)
    headers = [f"Representation ({_header(rows, metric)})"] + [escape(m) for m in methods]
    said = notes(rows, (metric,))
    chosen = [f"{r.representation}: {r.label}" for r in rows if r.tuning and r.label != r.requested]
    if chosen:
        said.append("Chosen values: " + "; ".join(chosen) + ".")
    if fmt == "latex":
        return _latex_table([escape(h) for h in headers], body, 1, caption, label,
                            ["bold: best classifier of the representation; underlined: best representation for the "
                             "classifier"] + said)
    from tabulate import tabulate
    table = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=["left"] + ["right"] * len(methods))
    table += "\n\nBold: best classifier of the representation (row). †: best representation for the classifier (column)."
    return table + "".join(f"\n\n{note}" for note in said)
