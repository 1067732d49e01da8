"""Ablation tables from sweep records. Tables pivot records; they never recompute.

Records are grouped by everything but the seed (representation, eval split, shot thresholds,
method, requested parameters); a group's seeds are aggregated as mean ± sample std. One label may
cover several cache entries only as seeds (a backbone per seed): where two entries of a group
share a seed, the group is split by entry (its rows name the key).
A group with a failed run (non-finite logits) shows ``failed`` and is never marked best.

Layouts: ``rows`` (one row per representation x method + parameters, sorted by the methods'
registered family, then registration order: the paper's first, joint first; a Representation
column when there are several) and ``grid`` (one row per representation, one column per method,
one metric; the best cell of each row and of each column marked)."""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError

from .base import FAMILIES, REGISTRY, display_name
from .records import IDENTITY_FIELDS, gc_paused, param_items, record_key, requested_params

COLUMNS = (("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("top1", "All"))
METRICS = {"top1": "All", "many": "Many", "medium": "Medium", "few": "Few"}
FORMATS = ("md", "csv", "latex", "json")
LAYOUTS = ("rows", "grid")


@dataclass
class Row:
    label: str  # method and parameters, as shown
    method: str
    seeds: int
    stats: dict  # column -> (mean, std) or None
    representation: str = ""
    context: str = ""  # eval split / shot thresholds, when they differ between rows
    failed: int = 0  # runs of the group that failed
    requested: str = ""  # method and requested parameters, without values chosen on val (grid columns)


def _label(method: str, params: dict, chosen: dict, defaults: dict | None = None) -> str:
    if defaults is None:
        defaults = REGISTRY[method].defaults() if method in REGISTRY else {}
    shown = []
    for key, value in sorted(params.items()):
        if key in ("seed", "device") or defaults.get(key) == value or \
                (isinstance(value, list) and list(defaults.get(key, ())) == value):
            continue
        text = f"{key}={value}"
        if value == "auto" and key in chosen:
            text += f": {np.mean(chosen[key]):.2g}"
        shown.append(text)
    name = display_name(method)
    return f"{name} ({', '.join(shown)})" if shown else name


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


def aggregate(records: list[dict]) -> list[Row]:
    """The table's rows: one pass over the records groups them (one key per record), then each group
    is summarised."""
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
    rows = []
    for (group_key, entry), members in parts.items():
        identity, method, _ = group_key
        params = groups[group_key][0]
        fields = dict(zip(IDENTITY_FIELDS, identity))
        chosen = {}
        for record in members:
            if record.get("selected_on") and method in REGISTRY:
                for name in REGISTRY[method].info.chosen_on_val:
                    chosen.setdefault(name, []).append(record["params"][name])
        failed = sum(r.get("status") != "ok" for r in members)
        stats = {}
        for column in METRICS:
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
        rows.append(Row(_label(method, params, chosen, method_defaults), method, len(members), stats,
                        fields["representation"], ", ".join(context), failed,
                        _label(method, params, {}, method_defaults)))
    rows.sort(key=lambda r: (position[r.representation], r.context, order.get(r.method, unregistered), r.label))
    return rows


def _groups(records: list[dict]) -> dict[tuple, tuple[dict, list[dict]]]:
    """Records by everything but the seed: key -> (requested parameters, records), in first-seen order."""
    groups: dict[tuple, tuple[dict, list[dict]]] = {}
    for record in records:
        params = requested_params(record)
        params.pop("seed", None)
        key = (tuple(record.get(f) for f in IDENTITY_FIELDS), record["method"], param_items(params))
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
    return max(means) if means else None


def _cell(row: Row, column: str, bold: bool, fmt: str, mark: str = "") -> str:
    if row.failed:
        return f"failed ({row.failed}/{row.seeds})" if row.seeds > 1 else "failed"
    stat = row.stats[column]
    if stat is None:
        return "-"
    mean, std = stat
    if fmt == "latex":
        text = f"{mean:.1f} \\pm {std:.1f}" if row.seeds > 1 else f"{mean:.1f}"
        text = f"\\mathbf{{{text}}}" if bold else text
        return f"\\underline{{${text}$}}" if mark else f"${text}$"
    text = f"{mean:.1f} ± {std:.1f}" if row.seeds > 1 else f"{mean:.1f}"
    return (f"**{text}**" if bold else text) + mark


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"),
                       ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, repl)
    return text.replace("tau", r"$\tau$")


def render(records: list[dict], fmt: str = "md", layout: str = "rows", metric: str = "top1") -> str:
    """The table of sweep records as Markdown, CSV, a LaTeX tabular, or JSON."""
    if layout not in LAYOUTS:
        raise FeatcacheError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    rows = aggregate(records)
    return render_rows(rows, fmt) if layout == "rows" else render_grid(rows, fmt, metric)


def render_rows(rows: list[Row], fmt: str = "md") -> str:
    """Aggregated rows (see :func:`aggregate`; labels may be changed) as a table."""
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    best = {c: _best(rows, c) for c, _ in COLUMNS}
    is_best = {(id(r), c): r.stats[c] is not None and r.stats[c][0] == best[c] for r in rows for c, _ in COLUMNS}
    several = len({r.representation for r in rows}) > 1
    context = any(r.context for r in rows)
    if fmt == "json":
        return json.dumps([{"representation": r.representation, "context": r.context, "method": r.method,
                            "label": r.label, "seeds": r.seeds, "failed": r.failed,
                            **{c: None if r.stats[c] is None else {"mean": r.stats[c][0], "std": r.stats[c][1],
                                                                  "best": is_best[(id(r), c)]}
                               for c, _ in COLUMNS}} for r in rows], indent=1)
    lead = (["Representation"] if several else []) + (["Setting"] if context else [])

    def leading(r: Row) -> list[str]:
        return ([r.representation] if several else []) + ([r.context] if context else [])

    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([h.lower() for h in lead] + ["method", "seeds", "failed"]
                        + [f"{h.lower()}_{s}" for _, h in COLUMNS for s in ("mean", "std")])
        for r in rows:
            writer.writerow(leading(r) + [r.label, r.seeds, r.failed]
                            + [("" if r.stats[c] is None else f"{r.stats[c][i]:.4f}") for c, _ in COLUMNS for i in (0, 1)])
        return buffer.getvalue().rstrip("\n")
    from tabulate import tabulate
    headers = lead + ["Method", "Seeds"] + [h for _, h in COLUMNS]
    escape = (lambda t: t) if fmt == "md" else _latex_escape
    body = [[escape(t) for t in leading(r)] + [escape(r.label), r.seeds]
            + [_cell(r, c, is_best[(id(r), c)], fmt) for c, _ in COLUMNS] for r in rows]
    return tabulate(body, headers=headers, tablefmt="github" if fmt == "md" else "latex_raw", disable_numparse=True)


def render_grid(rows: list[Row], fmt: str = "md", metric: str = "top1") -> str:
    """One row per representation, one column per method (+ parameters): ``metric`` as mean ± std.
    Marked: the best cell of each row (bold) and of each column (†; underlined in LaTeX)."""
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if metric not in METRICS:
        raise FeatcacheError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
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
                "seeds": row.seeds, "failed": row.failed,
                "best_in_row": flags(rep, m)[1], "best_in_column": flags(rep, m)[2]} for m in methods}}
            for rep in representations]}, indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["representation"] + methods)
        for rep in representations:
            values = []
            for m in methods:
                row = cells.get((rep, m))
                values.append("failed" if row is not None and row.failed else
                              "" if row is None or row.stats[metric] is None else f"{row.stats[metric][0]:.4f}")
            writer.writerow([rep] + values)
        return buffer.getvalue().rstrip("\n")
    from tabulate import tabulate
    escape = (lambda t: t) if fmt == "md" else _latex_escape
    body = []
    for rep in representations:
        line = [escape(rep)]
        for m in methods:
            row, in_row, in_column = flags(rep, m)
            line.append("-" if row is None else _cell(row, metric, in_row, fmt, ("†" if fmt == "md" else "u") if in_column else ""))
        body.append(line)
    headers = [f"Representation ({METRICS[metric]})"] + [escape(m) for m in methods]
    table = tabulate(body, headers=headers, tablefmt="github" if fmt == "md" else "latex_raw", disable_numparse=True)
    if fmt == "md":
        table += "\n\nBold: best classifier of the representation (row). †: best representation for the classifier (column)."
    return table
