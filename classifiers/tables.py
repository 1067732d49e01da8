"""Ablation tables from sweep records: one row per method + requested parameters, seeds
aggregated as mean ± std (sample std), sorted like the paper (joint first), best per column marked."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError

from .base import REGISTRY
from .sweep import requested_params

COLUMNS = (("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("top1", "All"))
DISPLAY = {"joint": "Joint", "ncm": "NCM", "crt": "cRT", "tau": "tau-norm", "lws": "LWS", "knn": "kNN",
           "logit_adjust": "Logit adjustment", "bsce": "cRT + balanced softmax", "maxnorm": "cRT + MaxNorm",
           "la_loss": "cRT + LA loss", "cb_loss": "cRT + CB loss", "ldam_drw": "cRT + LDAM-DRW",
           "las": "cRT + LAS (MiSLAS)", "disalign": "DisAlign", "marc": "MARC", "logreg": "LogReg (sklearn)"}
FORMATS = ("md", "csv", "latex", "json")


@dataclass
class Row:
    label: str
    method: str
    seeds: int
    stats: dict  # column -> (mean, std) or None


def _label(method: str, params: dict, chosen: dict) -> str:
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
    name = DISPLAY.get(method, method)
    return f"{name} ({', '.join(shown)})" if shown else name


def aggregate(records: list[dict]) -> list[Row]:
    if not records:
        raise FeatcacheError("no records to tabulate")
    groups: dict[str, list[dict]] = {}
    for record in records:
        params = {k: v for k, v in requested_params(record).items() if k != "seed"}
        key = json.dumps([record["method"], params], sort_keys=True, default=str)
        groups.setdefault(key, []).append(record)
    order = {name: i for i, name in enumerate(REGISTRY)}
    rows = []
    for key, members in sorted(groups.items(), key=lambda kv: (order.get(json.loads(kv[0])[0], 99), kv[0])):
        method, params = json.loads(key)
        chosen = {}
        for record in members:
            if record.get("selected_on"):
                for name in getattr(REGISTRY.get(method), "auto_params", ()):
                    chosen.setdefault(name, []).append(record["params"][name])
        stats = {}
        for column, _ in COLUMNS:
            values = [r[column] for r in members if r.get(column) is not None]
            stats[column] = None if not values else (float(np.mean(values)),
                                                     float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        rows.append(Row(_label(method, params, chosen), method, len(members), stats))
    return rows


def _best(rows: list[Row]) -> dict[str, float]:
    best = {}
    for column, _ in COLUMNS:
        means = [r.stats[column][0] for r in rows if r.stats[column] is not None]
        if means:
            best[column] = max(means)
    return best


def _cell(stat, seeds: int, bold: bool, fmt: str) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    if fmt == "latex":
        text = f"{mean:.1f} \\pm {std:.1f}" if seeds > 1 else f"{mean:.1f}"
        return f"$\\mathbf{{{text}}}$" if bold else f"${text}$"
    text = f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"
    return f"**{text}**" if bold else text


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"),
                       ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, repl)
    return text.replace("tau", r"$\tau$")


def render(records: list[dict], fmt: str = "md") -> str:
    """The table of sweep records as Markdown, CSV, a LaTeX tabular, or JSON."""
    return render_rows(aggregate(records), fmt)


def render_rows(rows: list[Row], fmt: str = "md") -> str:
    """Aggregated rows (see :func:`aggregate`; labels may be changed) as a table."""
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    best = _best(rows)
    is_best = {(id(r), c): r.stats[c] is not None and r.stats[c][0] == best.get(c) for r in rows for c, _ in COLUMNS}
    if fmt == "json":
        return json.dumps([{"method": r.method, "label": r.label, "seeds": r.seeds,
                            **{c: None if r.stats[c] is None else {"mean": r.stats[c][0], "std": r.stats[c][1],
                                                                  "best": is_best[(id(r), c)]}
                               for c, _ in COLUMNS}} for r in rows], indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["method", "seeds"] + [f"{h.lower()}_{s}" for _, h in COLUMNS for s in ("mean", "std")])
        for r in rows:
            writer.writerow([r.label, r.seeds] + [("" if r.stats[c] is None else f"{r.stats[c][i]:.4f}")
                                                  for c, _ in COLUMNS for i in (0, 1)])
        return buffer.getvalue().rstrip("\n")
    from tabulate import tabulate
    headers = ["Method", "Seeds"] + [h for _, h in COLUMNS]
    body = [[r.label if fmt == "md" else _latex_escape(r.label), r.seeds]
            + [_cell(r.stats[c], r.seeds, is_best[(id(r), c)], fmt) for c, _ in COLUMNS] for r in rows]
    if fmt == "md":
        return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
    return tabulate(body, headers=headers, tablefmt="latex_raw", disable_numparse=True)
