"""Sweep records are never lost or mixed; representations x classifiers in one sweep; bad lt-cls input."""
import csv
import fcntl
import io
import json

import numpy as np
import pytest
import torch

from classifiers.records import load_records
from cli.featcache_cmd import main as featcache
from cli.lt_cls_cmd import main as lt_cls
from tests.conftest import invoke
from tests.synthetic import long_tailed_features


def import_entry(runner, directory, name, seed=0, num_classes=8, with_classifier=True):
    data = long_tailed_features(num_classes=num_classes, max_count=300, imbalance=60, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    args = ["import", "--name", name]
    for split in ("train", "val", "test"):
        X, y = data[split]
        np.savez(directory / f"{split}.npz", features=X, labels=y)
        args += ["--split", f"{split}={directory / f'{split}.npz'}"]
    if with_classifier:
        torch.save({"fc.weight": torch.from_numpy(data["W"]), "fc.bias": torch.from_numpy(data["b"])},
                   directory / "clf.pth")
        args += ["--classifier", directory / "clf.pth"]
    return invoke(runner, featcache, args).output.split()[-1], data


@pytest.fixture
def entries(tmp_path, cache_dir, runner):
    return [import_entry(runner, tmp_path / f"e{i}", f"entry{i}", seed=i) for i in range(3)]


def sweep(runner, out, *args):
    return runner.invoke(lt_cls, ["sweep", "--out", str(out), "--quiet", "--no-plots", *map(str, args)])


def balanced(pred, y):
    return 100 * np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])


def independent_top1(method, data):
    """Balanced top-1 of joint / tau (tau = 1) / NCM (cl2n), written out in numpy."""
    (X, y), (Xt, yt), W, b = data["train"], data["test"], data["W"], data["b"]
    if method == "joint":
        return balanced((Xt @ W.T + b).argmax(1), yt)
    if method == "tau":
        return balanced((Xt @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T).argmax(1), yt)
    mean = X.mean(0)

    def cl2n(Z):
        Z = Z - mean
        return Z / np.linalg.norm(Z, axis=1, keepdims=True)
    centroids = np.stack([cl2n(X)[y == c].mean(0) for c in range(len(W))])
    distances = ((cl2n(Xt)[:, None, :] - centroids[None]) ** 2).sum(-1)
    return balanced(distances.argmin(1), yt)


def test_three_representations_in_one_sweep(entries, runner, tmp_path):
    out = tmp_path / "reps"
    labels = ("a", "b", "c")
    args = [x for label, (entry, _) in zip(labels, entries) for x in ("--cache", f"{label}={entry}")]
    result = sweep(runner, out, *args, "--methods", "joint,ncm,tau", "--param", "tau.tau=1.0", "--seeds", "0")
    assert result.exit_code == 0, result.output
    records = load_records(out / "results.jsonl")
    assert sorted((r["representation"], r["method"]) for r in records) == sorted(
        (label, m) for label in labels for m in ("joint", "ncm", "tau"))
    for record in records:
        data = entries[labels.index(record["representation"])][1]
        assert record["top1"] == pytest.approx(independent_top1(record["method"], data), abs=1e-6)
    grid = invoke(runner, lt_cls, ["table", out / "results.jsonl", "--layout", "grid", "--format", "csv"]).output
    rows = list(csv.reader(io.StringIO(grid)))
    assert rows[0] == ["representation"] + [f"{m} {s}" for m in ("Joint", "NCM", "tau-norm") for s in ("mean", "std")]
    assert [r[0] for r in rows[1:]] == list(labels)
    by_cell = {(r["representation"], r["method"]): r["top1"] for r in records}
    for row in rows[1:]:
        for method, value, std in zip(("joint", "ncm", "tau"), row[1::2], row[2::2]):
            assert float(value) == pytest.approx(by_cell[row[0], method], abs=1e-4) and float(std) == 0
    assert "| Representation" in result.output  # the default layout gains the column
    assert (out / "grid.md").is_file()


def test_table_merges_results_files_and_directories(entries, runner, tmp_path):
    (first, _), (second, _) = entries[:2]
    assert sweep(runner, tmp_path / "one", "--cache", f"a={first}", "--methods", "joint,ncm").exit_code == 0
    assert sweep(runner, tmp_path / "two", "--cache", f"b={second}", "--methods", "joint,ncm").exit_code == 0
    grid = invoke(runner, lt_cls, ["table", tmp_path / "one" / "results.jsonl", tmp_path / "two",
                                   "--layout", "grid", "--format", "csv", "--metric", "few"]).output
    rows = list(csv.reader(io.StringIO(grid)))
    assert [r[0] for r in rows[1:]] == ["a", "b"] and rows[0][1:] == ["Joint mean", "Joint std", "NCM mean", "NCM std"]
    markdown = invoke(runner, lt_cls, ["table", tmp_path / "one", tmp_path / "two", "--layout", "grid"]).output
    assert "**" in markdown and "†" in markdown


def test_default_label_is_the_entry_name(entries, runner, tmp_path):
    out = tmp_path / "named"
    assert sweep(runner, out, "--cache", entries[0][0], "--cache", entries[1][0], "--methods", "joint").exit_code == 0
    assert {r["representation"] for r in load_records(out / "results.jsonl")} == {"entry0", "entry1"}


def test_entries_with_other_classes_are_refused_before_any_run(runner, tmp_path, cache_dir):
    small, _ = import_entry(runner, tmp_path / "small", "small", num_classes=6)
    large, _ = import_entry(runner, tmp_path / "large", "large", num_classes=8)
    out = tmp_path / "mismatch"
    result = sweep(runner, out, "--cache", small, "--cache", large, "--methods", "joint")
    assert result.exit_code == 1 and result.output.startswith("Error:") and "classes" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "results.jsonl").exists()


def test_a_second_sweep_into_one_out_is_refused_and_changes_nothing(entries, runner, tmp_path):
    out, entry = tmp_path / "once", entries[0][0]
    assert sweep(runner, out, "--cache", entry, "--methods", "joint").exit_code == 0
    before = (out / "results.jsonl").read_bytes()
    again = sweep(runner, out, "--cache", entry, "--methods", "ncm")
    assert again.exit_code == 1 and "--resume" in again.output and "--overwrite" in again.output
    assert (out / "results.jsonl").read_bytes() == before
    assert sweep(runner, out, "--cache", entry, "--methods", "ncm", "--resume").exit_code == 0
    assert [r["method"] for r in load_records(out / "results.jsonl")] == ["joint", "ncm"]
    assert sweep(runner, out, "--cache", entry, "--methods", "knn", "--overwrite").exit_code == 0
    assert [r["method"] for r in load_records(out / "results.jsonl")] == ["knn"]


def test_a_locked_out_is_refused(entries, runner, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    with open(out / ".sweep.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = sweep(runner, out, "--cache", entries[0][0], "--methods", "joint")
    assert result.exit_code == 1 and "another sweep" in result.output
    assert not (out / "results.jsonl").exists()


def test_resume_with_another_eval_split_keeps_experiments_apart(entries, runner, tmp_path):
    out, entry = tmp_path / "splits", entries[0][0]
    assert sweep(runner, out, "--cache", entry, "--methods", "ncm").exit_code == 0
    assert sweep(runner, out, "--cache", entry, "--methods", "ncm", "--eval-split", "val", "--resume").exit_code == 0
    records = load_records(out / "results.jsonl")
    assert sorted(r["eval_split"] for r in records) == ["test", "val"]
    table = json.loads(invoke(runner, lt_cls, ["table", out, "--format", "json"]).output)
    assert len(table) == 2 and all(row["seeds"] == 1 for row in table)
    assert {row["context"] for row in table} == {"eval test", "eval val"}
    grid = runner.invoke(lt_cls, ["table", str(out), "--layout", "grid"])
    assert grid.exit_code == 1 and "one eval split" in grid.output


def test_a_diverged_run_is_recorded_as_failed_and_never_best(entries, runner, tmp_path):
    out = tmp_path / "diverged"
    result = sweep(runner, out, "--cache", entries[0][0], "--methods", "joint,crt", "--param", "crt.lr=1e30")
    assert result.exit_code == 0, result.output
    text = (out / "results.jsonl").read_text()
    for line in text.splitlines():  # standard JSON: no NaN / Infinity tokens
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard token {name}"))
    crt = next(r for r in load_records(out / "results.jsonl") if r["method"] == "crt")
    assert crt["status"] == "failed" and "non-finite" in crt["failure"] and crt["top1"] is None
    table = json.loads(invoke(runner, lt_cls, ["table", out, "--format", "json"]).output)
    failed = next(row for row in table if row["method"] == "crt")
    assert failed["failed"] == 1 and failed["top1"] is None
    assert next(row for row in table if row["method"] == "joint")["top1"]["best"]
    markdown = invoke(runner, lt_cls, ["table", out]).output
    assert "failed" in next(line for line in markdown.splitlines() if line.startswith("| cRT"))


def test_repeated_seeds_and_methods_run_once_and_say_so(entries, runner, tmp_path):
    out = tmp_path / "dupes"
    result = sweep(runner, out, "--cache", entries[0][0], "--methods", "ncm,ncm", "--seeds", "0,0,0")
    assert result.exit_code == 0
    assert len(load_records(out / "results.jsonl")) == 1
    assert result.output.count("given more than once") == 2


def test_interrupted_line_is_dropped_atomically_on_resume(entries, runner, tmp_path):
    out, entry = tmp_path / "partial", entries[0][0]
    assert sweep(runner, out, "--cache", entry, "--methods", "joint").exit_code == 0
    with open(out / "results.jsonl", "a") as handle:
        handle.write('{"method": "nc')
    assert sweep(runner, out, "--cache", entry, "--methods", "joint,ncm", "--resume").exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["joint", "ncm"]
    assert not list(out.glob(".*tmp*"))


def _write(path, text):
    path.write_text(text)
    return path


BAD_SWEEP = [
    (["--methods", "ncm", "--seeds", "abc"], "--seeds"),
    (["--methods", "ncm", "--seeds", "-1"], "--seeds"),
    (["--seeds", "0"], "--methods is required"),
    (["--methods", "tau", "--param", "tau.tau=abc"], "tau='abc'"),
    (["--methods", "crt", "--param", "crt.batch_size=0"], "batch_size=0"),
    (["--methods", "crt", "--param", "crt.epochs=1.5"], "epochs=1.5"),
    (["--methods", "crt", "--param", "crt.epochs=-1"], "epochs=-1"),
    (["--methods", "crt", "--param", "crt.lr=-0.1"], "lr=-0.1"),
    (["--methods", "crt", "--param", "crt.lr=nan"], "lr=nan"),
    (["--methods", "crt", "--param", "crt.sampler=balanced"], "sampler='balanced'"),
    (["--methods", "knn", "--param", "knn.k=0"], "k=0"),
    (["--methods", "knn", "--param", "knn.temperature=0"], "temperature=0"),
    (["--methods", "ncm", "--param", "ncm.metric=manhattan"], "metric='manhattan'"),
    (["--methods", "lws", "--param", "lws.momentum=1.5"], "momentum=1.5"),
    (["--methods", "ncm", "--many", "10", "--few", "200"], "overlap"),
    (["--methods", "svm"], "unknown method 'svm'"),
    (["--methods", "knn", "--param", "knn.kk=3"], "has no parameter kk"),
    (["--methods", "knn", "--param", "tau.tau=1"], "not in --methods"),
    (["--methods", "knn", "--param", "knn.k"], "METHOD.KEY=VALUE"),
    (["--methods", "knn", "--eval-split", "holdout"], "--eval-split 'holdout'"),
    (["--methods", "knn", "--val-split", "holdout"], "--val-split 'holdout'"),
    (["--methods", "knn", "--resume", "--overwrite"], "exclude each other"),
]


@pytest.mark.parametrize("args, message", BAD_SWEEP, ids=[" ".join(a) for a, _ in BAD_SWEEP])
def test_bad_sweep_input_is_one_error_line(entries, runner, tmp_path, args, message):
    out = tmp_path / "bad"
    result = runner.invoke(lt_cls, ["sweep", "--cache", entries[0][0], "--out", str(out), "--quiet", *args])
    assert result.exit_code != 0, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (out / "results.jsonl").exists()


def test_bad_files_are_one_error_line(entries, runner, tmp_path):
    entry = entries[0][0]
    sweep_dir = tmp_path / "ok"
    assert sweep(runner, sweep_dir, "--cache", entry, "--methods", "joint").exit_code == 0
    truncated = tmp_path / "truncated"
    assert sweep(runner, truncated, "--cache", entry, "--methods", "joint").exit_code == 0
    (truncated / "diagnostics.json").write_text('{"representations": {"x": ')
    record = json.loads((sweep_dir / "results.jsonl").read_text().splitlines()[0])
    cases = [
        (["table", _write(tmp_path / "notjson.jsonl", "hello\nworld\n")], "not a valid JSON record"),
        (["table", _write(tmp_path / "schema.jsonl", '{"a": 1}\n')], "not a sweep record"),
        (["table", _write(tmp_path / "nan.jsonl", json.dumps(record).replace('"top1": ', '"top1": NaN, "x": ')
                          + "\n" + json.dumps(record) + "\n")], "not a valid JSON record"),
        (["table", _write(tmp_path / "empty.jsonl", "")], "no records"),
        (["table", tmp_path / "e0"], "without results.jsonl"),
        (["plot", truncated], "damaged"),
        (["sweep", "--cache", entry, "--methods", "ncm", "--out", truncated, "--resume", "--quiet"], "damaged"),
        (["sweep", "--cache", entry, "--methods", "ncm", "--out", _write(tmp_path / "file", "x"), "--quiet"],
         "--out"),
        (["sweep", "--cache", "no-such-entry", "--methods", "ncm", "--out", tmp_path / "x1"], "no-such-entry"),
        (["sweep", "--cache", f"a={entry}", "--cache", f"a={entry}", "--methods", "ncm", "--out", tmp_path / "x2"],
         "names two entries"),
        (["sweep", "--cache", entry, "--out", tmp_path / "x3", "--config",
          _write(tmp_path / "a.toml", 'methods = ["ncm"]\ncolour = 1\n')], "unknown key 'colour'"),
        (["sweep", "--cache", entry, "--out", tmp_path / "x4", "--config",
          _write(tmp_path / "b.toml", "methods = [1, 2]\n")], "list of method names"),
        (["sweep", "--cache", entry, "--out", tmp_path / "x5", "--config", _write(tmp_path / "c.toml", "methods = [")],
         "--config"),
        (["sweep", "--cache", entry, "--out", tmp_path / "x6", "--config",
          _write(tmp_path / "d.toml", 'methods = ["ncm"]\nseeds = ["a"]\n')], "--seeds"),
    ]
    for args, message in cases:
        result = runner.invoke(lt_cls, [str(a) for a in args])
        assert result.exit_code != 0, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_toml_methods_as_a_string_is_a_comma_list(entries, runner, tmp_path):
    config = _write(tmp_path / "s.toml", 'methods = "joint,ncm"\n')
    out = tmp_path / "toml"
    assert sweep(runner, out, "--cache", entries[0][0], "--config", config).exit_code == 0
    assert [r["method"] for r in load_records(out / "results.jsonl")] == ["joint", "ncm"]


def test_one_label_over_several_entries_averages_only_distinct_seeds(entries, runner, tmp_path):
    (first, _), (second, _) = entries[:2]
    paired = tmp_path / "paired"  # a backbone per seed: entry 0 with seed 0, entry 1 with seed 1
    assert sweep(runner, paired, "--cache", f"IB={first}", "--methods", "ncm", "--seeds", "0").exit_code == 0
    assert sweep(runner, paired, "--cache", f"IB={second}", "--methods", "ncm", "--seeds", "1", "--resume").exit_code == 0
    (row,) = json.loads(invoke(runner, lt_cls, ["table", paired, "--format", "json"]).output)
    assert row["seeds"] == 2 and row["context"] == ""
    mixed = tmp_path / "mixed"  # two entries with the same seed are two experiments, never averaged
    assert sweep(runner, mixed, "--cache", f"IB={first}", "--methods", "ncm", "--seeds", "0").exit_code == 0
    assert sweep(runner, mixed, "--cache", f"IB={second}", "--methods", "ncm", "--seeds", "0", "--resume").exit_code == 0
    rows = json.loads(invoke(runner, lt_cls, ["table", mixed, "--format", "json"]).output)
    assert len(rows) == 2 and all(r["seeds"] == 1 and r["context"].startswith("entry ") for r in rows)


def test_extract_names_and_the_training_run_label_representations(tmp_path, cache_dir, runner):
    ckpt = invoke(runner, featcache, ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "1",
                                      "--sampler", "sqrt", "--seed", "3", "--out", tmp_path / "run", "--quiet"]
                  ).output.split()[-1]
    entry = invoke(runner, featcache, ["extract", "--ckpt", ckpt, "--quiet"]).output.split()[-1]
    assert sweep(runner, tmp_path / "unnamed", "--cache", entry, "--methods", "ncm").exit_code == 0
    assert load_records(tmp_path / "unnamed" / "results.jsonl")[0]["representation"] == "tinycnn/sqrt/e1/s3"
    assert invoke(runner, featcache, ["extract", "--ckpt", ckpt, "--name", "sr", "--quiet"]).output.split()[-1] == entry
    assert sweep(runner, tmp_path / "named", "--cache", "sr", "--methods", "ncm").exit_code == 0
    assert load_records(tmp_path / "named" / "results.jsonl")[0]["representation"] == "sr"
    other = tmp_path / "other"
    import_entry(runner, other, "taken")
    clash = runner.invoke(featcache, ["extract", "--ckpt", ckpt, "--name", "taken", "--quiet"])
    assert clash.exit_code == 1 and "already names entry" in clash.output


def test_a_sweep_that_cannot_fit_in_memory_is_refused_with_the_numbers(entries, runner, tmp_path, monkeypatch):
    import classifiers.sweep
    monkeypatch.setattr(classifiers.sweep, "available_memory", lambda device: (50_000, "this machine"))
    out = tmp_path / "oom"
    result = sweep(runner, out, "--cache", entries[0][0], "--methods", "joint,knn")
    assert result.exit_code == 1 and "GiB" in result.output and "method knn" in result.output
    assert "float16" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "results.jsonl").exists()
    assert sweep(runner, out, "--cache", entries[0][0], "--methods", "joint,knn", "--no-memory-check").exit_code == 0


def test_plot_of_several_representations_draws_figure_one(entries, runner, tmp_path):
    out = tmp_path / "fig1"
    result = runner.invoke(lt_cls, ["sweep", "--cache", f"a={entries[0][0]}", "--cache", f"b={entries[1][0]}",
                                    "--methods", "joint,tau,lws", "--param", "tau.tau=auto", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.glob("*.png")}
    assert {"representations.png", "weight_norms-a.png", "weight_norms-b.png", "tau_curve-a.png"} <= names
    pictures = invoke(runner, lt_cls, ["plot", out]).output.split()
    assert any(p.endswith("representations.png") for p in pictures)
