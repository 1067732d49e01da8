"""Tuned sweeps (--tune): one trial budget per method, choices on val only, every trial recorded;
NLL / ECE / top-5 in records and tables; empty shot groups said; plots in any format."""
import csv
import io
import json
import re

import numpy as np
import pytest
from sklearn.metrics import log_loss, top_k_accuracy_score

import classifiers.sweep
from classifiers import REGISTRY, create
from classifiers.metrics import calibration_bins, expected_calibration_error
from classifiers.records import SELECTION_METRICS, load_records
from classifiers.tables import METRIC_HEADERS
from classifiers.tuning import DEFAULT_BUDGET, best_trial, method_trials
from cli import lt_cls_cmd
from cli.lt_cls_cmd import main as lt_cls
from featcache.errors import FeatcacheError
from tests.conftest import invoke
from tests.synthetic import import_entry, long_tailed_features

PUBLISHED = ("crt", "lws", "tau", "la_loss", "cb_loss", "ldam_drw", "las", "bsce", "disalign", "marc")


@pytest.fixture
def data():
    return long_tailed_features(max_count=300, imbalance=60)


@pytest.fixture
def entry(tmp_path, cache_dir, runner, data):
    return import_entry(runner, tmp_path, "synthetic", data)


def sweep(runner, entry, out, *extra):
    return invoke(runner, lt_cls, ["sweep", "--cache", entry, "--out", out, "--quiet", "--no-plots", *extra])


def by_role(records, role):
    return [r for r in records if (r["tuning"] or {}).get("role") == role]


# -- the trials -----------------------------------------------------------------------------------
def test_every_search_space_value_is_a_valid_parameter():
    for name, cls in REGISTRY.items():
        for param, values in cls.info.search_space.items():
            assert values, (name, param)
            for value in values:
                create(name, **{param: value})  # raises on a value outside the declared constraints


def test_trials_respect_the_budget_start_at_the_defaults_and_never_depend_on_the_data():
    for name, cls in REGISTRY.items():
        trials = method_trials(name, {}, DEFAULT_BUDGET)
        size = int(np.prod([len(v) for v in cls.info.search_space.values()]))
        assert len(trials.params) == min(size, DEFAULT_BUDGET), name
        defaults = {k: v for k, v in cls.defaults().items() if k not in ("seed", "device")}
        assert trials.params[0] == cls.trial_params(defaults, set(trials.searched)), name
        assert len({json.dumps(p, sort_keys=True) for p in trials.params}) == len(trials.params), name
        assert method_trials(name, {}, DEFAULT_BUDGET) == trials  # deterministic: a function of the method only
    assert len(method_trials("cb_loss", {}, 3).params) == 3


def test_param_flags_fix_or_replace_a_dimension_and_ldam_reweights_at_four_fifths():
    trials = method_trials("crt", {"lr": [0.1, 0.3], "epochs": [5]}, DEFAULT_BUDGET)
    assert trials.searched == ("lr",)
    assert [(p["lr"], p["epochs"]) for p in trials.params] == [(0.1, 5), (0.3, 5)]  # 0.2 is not asked for
    ldam = method_trials("ldam_drw", {"max_margin": [0.5]}, DEFAULT_BUDGET)
    assert {(p["epochs"], p["drw_epoch"]) for p in ldam.params} == {(10, 8), (30, 24), (90, 72)}
    fixed = method_trials("ldam_drw", {"drw_epoch": [2], "max_margin": [0.5]}, DEFAULT_BUDGET)
    assert {p["drw_epoch"] for p in fixed.params} == {2}


def test_best_trial_takes_the_val_best_and_the_earlier_on_a_tie():
    def trial(score, nll, status="ok"):
        return {"status": status, "tuning": {"role": "trial", "val": {"top1": score, "nll": nll}}}
    trials = [trial(50.0, 1.0), trial(70.0, 0.9), trial(70.0, 0.5), trial(90.0, 0.1, "failed")]
    assert best_trial(trials, "top1") is trials[1]
    assert best_trial(trials, "nll") is trials[2]  # lower is better
    assert best_trial([trial(None, None)], "top1") is None


def test_cli_choices_are_the_modules_own():
    assert lt_cls_cmd.SELECTION_CHOICES == list(SELECTION_METRICS)
    assert sorted(lt_cls_cmd.METRIC_CHOICES) == sorted(METRIC_HEADERS)
    assert lt_cls_cmd.DEFAULT_BUDGET == DEFAULT_BUDGET


# -- the tuned sweep ------------------------------------------------------------------------------
def test_tuned_sweep_records_every_trial_and_the_val_best_with_its_choice(entry, runner, tmp_path):
    out = tmp_path / "tuned"
    result = sweep(runner, entry, out, "--methods", "joint,crt,tau", "--tune", "--budget", "5", "--seeds", "0,1")
    assert result.exit_code == 0, result.output
    records = load_records(out / "results.jsonl")
    trials, chosen = by_role(records, "trial"), by_role(records, "selected")
    assert len(trials) == 2 * (1 + 5 + 5) and len(chosen) == 2 * 3
    for record in chosen:
        mine = [t for t in trials if t["method"] == record["method"] and t["seed"] == record["seed"]]
        best = max(mine, key=lambda t: (t["tuning"]["val"]["top1"], -mine.index(t)))
        assert record["params"] == best["params"] and record["top1"] == best["top1"]
        assert record["selected_on"] == "val" and record["tuning"]["val"] == best["tuning"]["val"]
        assert record["tuning"]["chosen"] == {k: best["params"][k] for k in record["tuning"]["chosen"]}
        assert record["tuning"]["trials"] == len(mine) and record["tuning"]["budget"] == 5
        assert record["fit_seconds"] == pytest.approx(sum(t["fit_seconds"] for t in mine), abs=1e-3)
    assert "at most 5 trials" in result.output and "tuned: lr=" in result.output
    shown = invoke(runner, lt_cls, ["table", out, "--trials"]).output
    assert shown.count("(trial") == 5 + 5 + 1  # every trial shown on request, joint's one too


def test_permuting_the_test_labels_changes_no_choice(tmp_path, cache_dir, runner, data):
    rng = np.random.default_rng(7)
    permuted = {**data, "test": (data["test"][0], rng.permutation(data["test"][1]))}
    first = import_entry(runner, tmp_path / "a", "original", data)
    second = import_entry(runner, tmp_path / "b", "permuted", permuted)
    methods = "crt,tau,la_loss,knn"
    for name, entry in (("one", first), ("two", second)):
        assert sweep(runner, entry, tmp_path / name, "--methods", methods, "--tune", "--budget", "4").exit_code == 0
    choices = [{(r["method"], r["seed"]): (r["params"], r["tuning"]["chosen"], r["tuning"]["val"])
                for r in by_role(load_records(tmp_path / name / "results.jsonl"), "selected")}
               for name in ("one", "two")]
    assert choices[0] == choices[1] and len(choices[0]) == 4
    tests = [{r["method"]: r["top1"] for r in by_role(load_records(tmp_path / n / "results.jsonl"), "selected")}
             for n in ("one", "two")]
    assert tests[0] != tests[1]  # the test numbers did change: the labels were used for them only


def test_interrupted_tuned_sweep_resumes_to_the_same_records(entry, runner, tmp_path, monkeypatch):
    args = ("--methods", "crt,ncm", "--tune", "--budget", "3", "--seeds", "0,1")
    assert sweep(runner, entry, tmp_path / "whole", *args).exit_code == 0
    real, calls = classifiers.sweep.Sweeper._run, []

    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(classifiers.sweep.Sweeper, "_run", dying)
    runner.invoke(lt_cls, ["sweep", "--cache", entry, "--out", str(tmp_path / "cut"), "--quiet", "--no-plots", *args])
    assert 0 < len(load_records(tmp_path / "cut" / "results.jsonl")) < 14
    monkeypatch.setattr(classifiers.sweep.Sweeper, "_run", real)
    assert sweep(runner, entry, tmp_path / "cut", "--resume", *args).exit_code == 0

    def summary(name):
        records = load_records(tmp_path / name / "results.jsonl")
        return sorted((r["method"], r["seed"], r["tuning"]["role"], json.dumps(r["params"], sort_keys=True),
                       r["top1"]) for r in records)
    assert summary("cut") == summary("whole")
    # choosing by another metric reuses every trial: only the new choices are written
    monkeypatch.setattr(classifiers.sweep.Sweeper, "_run", lambda *a, **k: pytest.fail("a trial ran again"))
    assert sweep(runner, entry, tmp_path / "cut", "--resume", *args, "--select-metric", "nll").exit_code == 0
    records = load_records(tmp_path / "cut" / "results.jsonl")
    assert sorted(r["tuning"]["metric"] for r in by_role(records, "selected")) == ["nll"] * 4 + ["top1"] * 4


def test_tuned_sweep_over_two_representations(tmp_path, cache_dir, runner, data):
    other = long_tailed_features(max_count=300, imbalance=60, seed=5)
    first, second = (import_entry(runner, tmp_path / n, n, d) for n, d in (("a", data), ("b", other)))
    out = tmp_path / "two"
    result = invoke(runner, lt_cls, ["sweep", "--cache", first, "--cache", second, "--methods", "joint,lws",
                                     "--tune", "--budget", "3", "--out", out, "--quiet", "--no-plots"])
    assert result.exit_code == 0, result.output
    chosen = by_role(load_records(out / "results.jsonl"), "selected")
    assert sorted((r["representation"], r["method"]) for r in chosen) == [
        ("a", "joint"), ("a", "lws"), ("b", "joint"), ("b", "lws")]
    grid = (out / "grid.md").read_text()
    assert "LWS (tuned)" in grid and "Chosen values:" in grid


@pytest.mark.parametrize("args, message", [
    (("--tune", "--eval-split", "val"), "the split the table reports"),
    (("--budget", "4"), "add --tune"),
    (("--tune", "--budget", "0"), "--budget 0"),
])
def test_bad_tuning_input_is_one_line(entry, runner, tmp_path, args, message):
    result = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--out", str(tmp_path / "bad"), "--quiet",
                                    "--methods", "crt", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "bad" / "results.jsonl").exists()


def test_tuning_needs_a_val_split(tmp_path, cache_dir, runner, data):
    no_val = import_entry(runner, tmp_path / "noval", "noval", {k: v for k, v in data.items() if k != "val"})
    result = runner.invoke(lt_cls, ["sweep", "--cache", no_val, "--out", str(tmp_path / "o"), "--methods", "crt",
                                    "--tune"])
    assert result.exit_code != 0 and "--tune chooses each method's trial on a val split" in result.output


def test_every_published_method_beats_joint_when_tuned(entry, runner, tmp_path):
    """On a long-tailed problem whose joint classifier is head-biased, as joint training makes it."""
    out = tmp_path / "published"
    result = sweep(runner, entry, out, "--methods", "joint," + ",".join(PUBLISHED), "--tune", "--budget", "6")
    assert result.exit_code == 0, result.output
    chosen = {r["method"]: r for r in by_role(load_records(out / "results.jsonl"), "selected")}
    for method in PUBLISHED:
        assert chosen[method]["top1"] > chosen["joint"]["top1"], method
        assert chosen[method]["few"] > chosen["joint"]["few"], method


# -- calibration in records, tables and plots -----------------------------------------------------
def independent_ece(probs, y, bins=15):
    confidence, correct = probs.max(1), probs.argmax(1) == y
    total = 0.0
    for low in np.arange(bins) / bins:
        inside = (confidence > low) & (confidence <= low + 1 / bins)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return 100 * total / len(y)


def test_records_and_tables_carry_nll_ece_top5_equal_to_an_independent_computation(entry, runner, tmp_path, data):
    out = tmp_path / "calibration"
    assert sweep(runner, entry, out, "--methods", "joint,ncm", "--seeds", "0").exit_code == 0
    records = {r["method"]: r for r in load_records(out / "results.jsonl")}
    W, b = data["W"], data["b"]
    X, y = data["test"]
    logits = {"joint": X @ W.T + b,
              "ncm": create("ncm").fit(*data["train"], class_counts=data["counts"]).logits(X)}
    table = json.loads(invoke(runner, lt_cls, ["table", out, "--metrics", "ece,nll,top5", "--format", "json"]).output)
    shown = {row["method"]: row for row in table}
    for method, z in logits.items():
        z = z.astype(np.float64)
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        expected = {"nll": log_loss(y, probs, labels=np.arange(len(W))),
                    "top5": 100 * top_k_accuracy_score(y, z, k=5, labels=np.arange(len(W))),
                    "ece": independent_ece(probs, y)}
        for metric, value in expected.items():
            assert records[method][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (method, metric)
            assert shown[method][metric]["mean"] == pytest.approx(value, rel=1e-4, abs=1e-4), (method, metric)
        assert expected_calibration_error(z, y) * 100 == pytest.approx(expected["ece"], abs=1e-6)
    assert shown["joint"]["nll"]["best"] != shown["ncm"]["nll"]["best"]
    lower = min(shown, key=lambda m: shown[m]["nll"]["mean"])
    assert shown[lower]["nll"]["best"]  # the lowest NLL is the best one
    rows = invoke(runner, lt_cls, ["table", out, "--metrics", "top1,ece,nll"]).output
    assert "ECE (%)" in rows and "NLL" in rows


def test_reliability_bins_and_plots_in_any_format(entry, runner, tmp_path, data):
    out = tmp_path / "plots"
    assert invoke(runner, lt_cls, ["sweep", "--cache", entry, "--out", out, "--quiet", "--methods", "joint,crt",
                                   "--plot-format", "pdf"]).exit_code == 0
    diagnostics = json.loads((out / "diagnostics.json").read_text())["representations"]["synthetic"]
    X, y = data["test"]
    expected, found = calibration_bins(X @ data["W"].T + data["b"], y), diagnostics["reliability"]["joint"]
    assert found["count"] == expected["count"]
    for name in ("confidence", "accuracy"):
        assert [v is None for v in found[name]] == [v is None for v in expected[name]]
        assert np.allclose([v for v in found[name] if v is not None], [v for v in expected[name] if v is not None])
    assert (out / "reliability.pdf").read_bytes().startswith(b"%PDF")
    pictures = invoke(runner, lt_cls, ["plot", out, "--format", "svg"]).output.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in pictures) == ["per_class_accuracy.svg", "reliability.svg",
                                                              "weight_norms.svg"]
    small, large = (invoke(runner, lt_cls, ["plot", out, "--dpi", str(d)]) for d in (50, 200))
    assert small.exit_code == 0 and large.exit_code == 0
    assert (out / "reliability.png").stat().st_size > 0


# -- what tables say -------------------------------------------------------------------------------
def test_an_empty_few_group_is_said_and_thresholds_are_in_the_headers(entry, runner, tmp_path):
    out = tmp_path / "nofew"
    result = sweep(runner, entry, out, "--methods", "joint,ncm", "--few", "1")
    assert result.exit_code == 0, result.output
    assert "Few (<1)" in result.output and "Many (>100)" in result.output and "Medium (1-100)" in result.output
    assert re.search(r"\|\s+empty\s+\|", result.output)
    assert "Few: empty: no class of the test split has fewer than 1 training images" in result.output
    record = load_records(out / "results.jsonl")[0]
    assert record["few"] is None and record["n_few"] == 0


def test_gridded_labels_keep_the_default_value(entry, runner, tmp_path):
    out = tmp_path / "grid"
    result = sweep(runner, entry, out, "--methods", "knn", "--param", "knn.k=10,20")
    assert result.exit_code == 0, result.output
    assert "kNN (k=10)" in result.output and "kNN (k=20)" in result.output


def test_latex_is_booktabs_right_aligned_with_caption_and_label(entry, runner, tmp_path):
    out = tmp_path / "latex"
    assert sweep(runner, entry, out, "--methods", "joint,crt", "--seeds", "0,1").exit_code == 0
    latex = invoke(runner, lt_cls, ["table", out, "--format", "latex", "--caption", "Top-1 & more",
                                    "--label", "tab:main"]).output
    assert latex.startswith("\\begin{table}[t]") and "\\caption{Top-1 \\& more}" in latex
    assert "\\label{tab:main}" in latex and "\\begin{tabular}{lrrrrr}" in latex
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex and "\\hline" not in latex
    grid_csv = invoke(runner, lt_cls, ["table", out, "--layout", "grid", "--format", "csv"]).output
    header = next(csv.reader(io.StringIO(grid_csv)))
    assert header == ["representation", "Joint mean", "Joint std", "cRT mean", "cRT std"]


def test_unknown_metric_is_one_line(entry, runner, tmp_path):
    out = tmp_path / "m"
    assert sweep(runner, entry, out, "--methods", "joint").exit_code == 0
    result = runner.invoke(lt_cls, ["table", str(out), "--metrics", "top1,bogus"])
    assert result.exit_code != 0 and "--metrics" in result.output and "nll" in result.output


def test_records_refuse_a_bad_tuning_object(tmp_path, entry, runner):
    out = tmp_path / "t"
    assert sweep(runner, entry, out, "--methods", "crt", "--tune", "--budget", "2").exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    record["tuning"]["budget"] = 0
    (out / "results.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(record)]) + "\n")
    with pytest.raises(FeatcacheError, match="tuning.budget"):
        load_records(out / "results.jsonl")


def test_methods_doc_lists_every_search_space():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    for name, cls in REGISTRY.items():
        space = "; ".join(f"{k} {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}"
                          for k, values in cls.info.search_space.items()) or "(nothing to tune)"
        trials = len(method_trials(name, {}, DEFAULT_BUDGET).params)
        assert f"| `{name}` | {space} | {int(np.prod([len(v) for v in cls.info.search_space.values()]))} | {trials} |" \
            in doc, f"docs/methods.md: the search space of {name} is not the registry's"


def test_the_config_example_in_sweep_help_is_a_valid_config(tmp_path):
    from cli.sweep_config import load_config
    text = lt_cls.commands["sweep"].help.split("A --config file (TOML; flags override it):", 1)[1]
    example = tmp_path / "sweep.toml"
    example.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
    settings = load_config(str(example))
    assert settings["methods"] == ["joint", "crt", "knn"] and settings["params"]["knn"]["k"] == [10, 20, 50]
    assert settings["executor"]["kind"] == "slurm" and settings["tune"] is False


def test_a_choice_without_a_choosable_trial_is_a_failed_record_that_says_why():
    from classifiers.records import RECORD_FIELDS, check_record
    from classifiers.tuning import selection_record
    base = {**dict.fromkeys(RECORD_FIELDS), "method": "crt", "params": {"lr": 0.2}, "seed": 0, "representation": "r",
            "eval_split": "test", "many_threshold": 100, "few_threshold": 20, "cache_key": "k", "version": "0",
            "fit_seconds": 1.0, "eval_seconds": 0.5}
    failed = {**base, "status": "failed", "failure": "non-finite logits", "tuning": {"role": "trial", "val": None}}
    record = selection_record([failed, failed], "top1", 4, ("lr",), "val")
    assert record["status"] == "failed" and "every one of its 2 trials failed" in record["failure"]
    assert record["fit_seconds"] == 2.0 and record["tuning"]["failed_trials"] == 2 and check_record(record) is None
    no_few = {**base, "status": "ok", "failure": None, "top1": 50.0,
              "tuning": {"role": "trial", "val": {"top1": 40.0, "few": None}}}
    record = selection_record([no_few], "few", 4, ("lr",), "val")
    assert record["status"] == "failed" and "no class in that shot group" in record["failure"]
    assert record["top1"] is None and record["tuning"]["chosen"] == {}
