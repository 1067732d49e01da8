"""lt-cls sweep / table / list / plot on an entry made by `featcache import`."""
import json
import re

import numpy as np
import pytest
import torch

from classifiers import REGISTRY
from classifiers.records import RECORD_FIELDS, load_records
from classifiers.sweep import Representation, SweepSpec, Sweeper, flushing_denormals
from cli.lt_cls_cmd import main as lt_cls
from featcache import FeatureCache
from featcache.errors import FeatcacheError
from tests.conftest import invoke
from tests.synthetic import import_entry, long_tailed_features


@pytest.fixture
def entry(tmp_path, cache_dir, runner):
    return import_entry(runner, tmp_path, "synthetic", long_tailed_features(max_count=300, imbalance=60))


def sweep(runner, entry, out, *extra):
    return invoke(runner, lt_cls, ["sweep", "--cache", entry, "--out", out, "--quiet", "--no-plots", *extra])


def test_records_have_exactly_the_schema(entry, runner, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(runner, entry, out, "--methods", "crt,tau,lws,ncm", "--param", "tau.tau=1.0")
    records = load_records(out / "results.jsonl")
    assert [r["method"] for r in records] == ["crt", "tau", "lws", "ncm"]
    for record in records:
        assert list(record) == list(RECORD_FIELDS)
        assert record["cache_key"] == FeatureCache.open(entry).key and record["eval_split"] == "test"
        assert 0 <= record["top1"] <= 100 and record["n_many"] + record["n_medium"] + record["n_few"] == 8
        assert record["fit_seconds"] >= 0 and isinstance(record["params"], dict)
    tau = records[1]
    assert tau["params"]["tau"] == 1.0 and tau["selected_on"] is None
    assert records[0]["params"]["epochs"] == 10 and records[0]["params"]["sampler"] == "class"
    lines = result.output.splitlines()
    assert lines[0].startswith("| Method") and "Many" in lines[0] and "Few" in lines[0] and "All" in lines[0]
    for name in ("cRT", "tau-norm", "LWS", "NCM"):
        assert any(line.startswith(f"| {name}") for line in lines)
    for table in ("table.md", "table.csv", "table.tex"):
        assert (out / table).is_file()


def test_tau_auto_records_val_and_the_chosen_tau(entry, runner, tmp_path):
    out = tmp_path / "auto"
    sweep(runner, entry, out, "--methods", "tau,logit_adjust", "--param", "tau.tau=auto",
          "--param", "logit_adjust.tau=auto")
    tau, adjust = load_records(out / "results.jsonl")
    cache = FeatureCache.open(entry)
    from classifiers import create
    val = cache.split("val")
    expected = create("tau", tau="auto").fit(cache.split("train").features, cache.split("train").labels,
                                             classifier=cache.classifier, val=(val.features, val.labels)).tau_
    assert tau["selected_on"] == "val" and tau["params"]["tau"] == expected
    assert adjust["selected_on"] == "val" and isinstance(adjust["params"]["tau"], float)


def test_param_grid_and_seeds(entry, runner, tmp_path):
    out = tmp_path / "grid"
    sweep(runner, entry, out, "--methods", "knn,crt", "--param", "knn.k=1,5", "--param", "crt.sampler=class,sqrt",
          "--seeds", "0,1")
    records = load_records(out / "results.jsonl")
    assert sorted((r["method"], r["params"].get("k"), r["params"].get("sampler"), r["seed"]) for r in records) == sorted(
        [("knn", k, None, s) for k in (1, 5) for s in (0, 1)] + [("crt", None, m, s) for m in ("class", "sqrt") for s in (0, 1)])
    assert {r["params"]["seed"] for r in records if r["method"] == "crt"} == {0, 1}


def test_config_file(entry, runner, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('methods = ["joint", "knn"]\nseeds = [3]\n[params.knn]\nk = [2, 4]\n')
    out = tmp_path / "cfg"
    sweep(runner, entry, out, "--config", config)
    records = load_records(out / "results.jsonl")
    assert [(r["method"], r["params"].get("k"), r["seed"]) for r in records] == [("joint", None, 3), ("knn", 2, 3), ("knn", 4, 3)]


def test_table_aggregates_seeds_as_mean_and_std(entry, runner, tmp_path):
    out = tmp_path / "seeds"
    sweep(runner, entry, out, "--methods", "joint,crt", "--seeds", "0,1,2")
    records = [r for r in load_records(out / "results.jsonl") if r["method"] == "crt"]
    top1 = [r["top1"] for r in records]
    result = json.loads(invoke(runner, lt_cls, ["table", out / "results.jsonl", "--format", "json"]).output)
    assert [row["method"] for row in result] == ["joint", "crt"]
    crt = result[1]
    assert crt["seeds"] == 3
    assert crt["top1"]["mean"] == pytest.approx(np.mean(top1)) and crt["top1"]["std"] == pytest.approx(np.std(top1, ddof=1))
    markdown = invoke(runner, lt_cls, ["table", out / "results.jsonl"]).output
    assert f"{np.mean(top1):.1f} ± {np.std(top1, ddof=1):.1f}" in markdown
    best = max(result, key=lambda row: row["top1"]["mean"])
    assert best["top1"]["best"] and f"**{best['top1']['mean']:.1f} ±" in markdown


def test_latex_table_is_a_valid_tabular(entry, runner, tmp_path):
    out = tmp_path / "tex"
    sweep(runner, entry, out, "--methods", "joint,tau,logit_adjust", "--seeds", "0,1", "--param", "tau.tau=auto")
    latex = invoke(runner, lt_cls, ["table", out / "results.jsonl", "--format", "latex"]).output.strip()
    assert latex.startswith("\\begin{tabular}") and latex.endswith("\\end{tabular}")
    columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", latex).group(1))
    rows = [line for line in latex.splitlines() if line.rstrip().endswith("\\\\")]
    assert len(rows) == 4  # header + 3 methods
    for row in rows:
        assert row.count("&") == columns - 1
        assert row.count("$") % 2 == 0 and row.count("{") == row.count("}")
    assert "logit\\_adjust" not in latex and "Logit adjustment" in latex


def test_interrupt_and_resume_does_not_repeat_runs(entry, tmp_path, runner, monkeypatch):
    spec = SweepSpec(["joint", "crt", "ncm", "knn"], seeds=[0, 1])
    out = tmp_path / "resume"
    finished = []
    with Sweeper([Representation("synthetic", FeatureCache.open(entry))], spec, out) as first:
        for record in first:  # interrupted after three runs
            finished.append(record)
            if len(finished) == 3:
                break
    assert len(load_records(out / "results.jsonl")) == 3
    with open(out / "results.jsonl", "a") as handle:  # a half-written line from the kill
        handle.write('{"method": "cr')
    executed = []
    original = Sweeper._run
    monkeypatch.setattr(Sweeper, "_run", lambda self, run, *a, **k: executed.append((run.method, run.seed)) or original(self, run, *a, **k))
    result = invoke(runner, lt_cls, ["sweep", "--cache", entry, "--methods", "joint,crt,ncm,knn", "--seeds", "0,1",
                                     "--out", out, "--resume", "--quiet", "--no-plots"])
    keys = [(r["method"], r["seed"]) for r in load_records(out / "results.jsonl")]
    assert len(keys) == 8 and len(set(keys)) == 8
    assert len(executed) == 5 and not set(executed) & {(r["method"], r["seed"]) for r in finished}
    assert "| cRT" in result.output


def test_sweeper_flushes_denormals_while_entered_and_restores_the_mode(entry, tmp_path):
    original = flushing_denormals()
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        for before in (False, True):
            torch.set_flush_denormal(before)
            out = tmp_path / f"flush-{before}"
            with Sweeper([Representation("synthetic", FeatureCache.open(entry))], SweepSpec(["ncm"]), out) as sweeper:
                assert flushing_denormals()
                assert [r["status"] for r in sweeper] == ["ok"]
            assert flushing_denormals() is before
            with pytest.raises(FeatcacheError, match="already holds 1 record"):  # refused on entering
                Sweeper([Representation("synthetic", FeatureCache.open(entry))], SweepSpec(["ncm"]), out).__enter__()
            assert flushing_denormals() is before
    finally:
        torch.set_flush_denormal(original)


def test_sweep_from_checkpoint_gets_or_extracts(tiny_ckpt, cache_dir, runner, tmp_path):
    out = tmp_path / "from-ckpt"
    result = invoke(runner, lt_cls, ["sweep", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--methods", "joint,ncm",
                                     "--out", out, "--quiet"])
    assert "| Joint" in result.output and "| NCM" in result.output
    assert (out / "weight_norms.png").is_file() and (out / "per_class_accuracy.png").is_file()
    assert len(list(cache_dir.glob("*/manifest.json"))) == 1


def test_plots_include_the_tau_curve(entry, runner, tmp_path):
    out = tmp_path / "plots"
    invoke(runner, lt_cls, ["sweep", "--cache", entry, "--out", out, "--quiet", "--methods", "joint,crt,tau,lws",
                            "--param", "tau.tau=auto"])
    diagnostics = json.loads((out / "diagnostics.json").read_text())["representations"]["synthetic"]
    assert set(diagnostics["weight_norms"]) == {"joint", "crt", "tau", "lws"}
    assert len(diagnostics["tau_curve"]["val"]) == 21 and len(diagnostics["tau_curve"]["test"]) == 21
    pictures = invoke(runner, lt_cls, ["plot", out]).output.split()
    assert sorted(p.split("/")[-1] for p in pictures) == ["per_class_accuracy.png", "reliability.png", "tau_curve.png",
                                                          "weight_norms.png"]


def test_list_shows_the_registry(runner):
    output = invoke(runner, lt_cls, ["list"]).output
    for name in REGISTRY:
        assert re.search(rf"^{name}\s", output, re.M)
    assert "k=20" in output and "temperature=0.07" in output


@pytest.mark.parametrize("args, message", [
    (["--methods", "svm"], "unknown method 'svm'"),
    (["--methods", "knn", "--param", "knn.kk=3"], "has no parameter kk"),
    (["--methods", "knn", "--param", "tau.tau=1"], "not in --methods"),
    (["--methods", "knn", "--eval-split", "holdout"], "--eval-split 'holdout'"),
])
def test_bad_sweep_input_is_one_line(entry, runner, tmp_path, args, message):
    result = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--out", str(tmp_path / "bad"), "--quiet", *args])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_resume_and_table_over_20k_records_do_linear_work_and_aggregate_once(entry, runner, tmp_path, monkeypatch):
    """20k records (200 tau values x 100 seeds), nothing left to run: the records are read once, each
    record's key is computed once, the parameters are checked once per setting (not per seed), the
    records are aggregated once and each table file rendered once."""
    import classifiers.plots
    import classifiers.records
    import classifiers.sweep
    import classifiers.tables

    out = tmp_path / "big"
    sweep(runner, entry, out, "--methods", "tau", "--param", "tau.tau=0.5")
    (template,) = load_records(out / "results.jsonl")
    taus, seeds = [round(0.01 * i, 2) for i in range(1, 201)], list(range(100))
    rng = np.random.default_rng(0)
    with open(out / "results.jsonl", "w") as handle:
        for tau in taus:
            for seed in seeds:
                handle.write(json.dumps({**template, "params": {**template["params"], "tau": tau}, "seed": seed,
                                         "top1": float(rng.uniform(40, 60))}) + "\n")
    total = len(taus) * len(seeds)
    calls: dict[str, int] = {}

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((classifiers.records, "load_records"), (classifiers.sweep, "load_records"),
                         (classifiers.plots, "load_records"), (classifiers.sweep, "record_key"),
                         (classifiers.tables, "record_key"), (classifiers.records, "requested_params"),
                         (classifiers.tables, "requested_params"), (classifiers.tables, "aggregate"),
                         (classifiers.tables, "render_rows"), (classifiers.tables, "render_grid"),
                         (classifiers.sweep, "create")):
        counted(module, name)
    result = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--out", str(out), "--quiet", "--resume", "--methods",
                                    "tau", "--param", "tau.tau=" + ",".join(map(str, taus)),
                                    "--seeds", ",".join(map(str, seeds))])
    assert result.exit_code == 0, result.output
    assert len(load_records(out / "results.jsonl")) == total  # nothing was run (the unwrapped reader)
    sweep_calls = dict(calls)
    assert sweep_calls.pop("load_records") == 1, sweep_calls  # the plots reuse the sweep's records
    assert sweep_calls["aggregate"] == 1, sweep_calls  # once for table.md/.csv/.tex, stdout and the plots
    assert sweep_calls["render_rows"] == 3 and "render_grid" not in sweep_calls, sweep_calls
    assert sweep_calls["record_key"] == total, sweep_calls  # the done runs, once each
    assert sweep_calls["requested_params"] <= 2 * total, sweep_calls  # the keys and the groups
    assert sweep_calls["create"] <= 2 * len(taus) + 2, sweep_calls  # the grid and the memory check, seeds aside
    calls.clear()
    table = runner.invoke(lt_cls, ["table", str(out)])
    assert table.exit_code == 0, table.output
    assert calls == {"load_records": 1, "record_key": total, "requested_params": 2 * total, "aggregate": 1,
                     "render_rows": 1}, calls
    assert table.output.count("\n") >= len(taus) and "± " in table.output


def test_choosing_on_the_reported_split_is_refused(entry, runner, tmp_path):
    """tau=auto chooses on val: a table that reports val would report the split that chose it."""
    out = tmp_path / "sweep"
    result = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--methods", "joint,tau", "--param", "tau.tau=auto",
                                    "--eval-split", "val", "--out", str(out), "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "tau.tau=auto chooses on" in lines[0], result.output
    assert not (out / "results.jsonl").exists()
    fixed = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--methods", "joint,tau", "--param", "tau.tau=1.0",
                                   "--eval-split", "val", "--out", str(out), "--quiet"])
    assert fixed.exit_code == 0, fixed.output  # nothing chosen on val: val may be reported
