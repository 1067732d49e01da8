"""Every lt-cls error path on a bad file or value: exit != 0, exactly one `Error:` line naming the
file (and line) or the option, no traceback, no number printed that is not one. Records read from
disk are checked as the sweep writes them (docs/records.md)."""
import json
import subprocess
import sys

import pytest

from cli.lt_cls_cmd import main as lt_cls
from tests.conftest import invoke
from tests.synthetic import import_entry, long_tailed_features


@pytest.fixture
def swept(tmp_path, cache_dir, runner):
    """An entry and a sweep of it (joint, tau with tau=auto: a per-class curve and a tau curve)."""
    entry = import_entry(runner, tmp_path, "bad-inputs", long_tailed_features(num_classes=8, max_count=300,
                                                                             imbalance=60))
    out = tmp_path / "sweep"
    invoke(runner, lt_cls, ["sweep", "--cache", entry, "--methods", "joint,tau", "--param", "tau.tau=auto",
                            "--seeds", "0,1", "--out", out, "--quiet", "--no-plots"])
    return entry, out


def one_error_line(result, *needles):
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], result.output
    return lines[0]


def records_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def write_records(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def bad_record(record, field, value):
    raw = json.dumps({**record, field: "PLACEHOLDER"})
    return raw.replace('"PLACEHOLDER"', value)


BAD_RECORDS = [  # (field, JSON text of its value, what the error says)
    ("top1", '"abc"', "metric top1 'abc' is not a finite number"),
    ("top1", "1e400", "metric top1 (beyond the float range) is not a finite number"),
    ("many", "-1e400", "metric many (beyond the float range) is not a finite number"),
    ("top1", "null", "metric top1 is null on an 'ok' record"),
    ("ece", "null", "metric ece is null"),
    ("top1", "100.5", "outside 0..100"),
    ("top1", "1" + "0" * 400, "metric top1 1000000000000000000000000000000000000... is outside 0..100"),
    ("n_many", "1e400", "n_many (beyond the float range) is not a non-negative integer"),
    ("ece", "-0.1", "outside 0..100"),
    ("few", "true", "metric few True is not a finite number"),
    ("n_few", "-2", "n_few -2 is not a non-negative integer"),
    ("n_many", "1.5", "n_many 1.5 is not a non-negative integer"),
    ("seed", str(2**64), "seed 18446744073709551616"),
    ("seed", "-1", "seed -1"),
    ("seed", "true", "seed True is not an integer"),
    ("status", '"done"', "status 'done'"),
    ("many_threshold", '"100"', "many_threshold '100'"),
    ("fit_seconds", "1e999", "fit_seconds (beyond the float range)"),
    ("colour", '"red"', "unknown field 'colour'"),
    ("representation", "3", "representation 3 is not a string"),
    ("selected_on", "[]", "selected_on [] is neither a string nor null"),
]


@pytest.mark.parametrize("field, value, message", BAD_RECORDS, ids=[f"{f}={v}" for f, v, _ in BAD_RECORDS])
def test_a_bad_record_is_a_one_line_error_naming_file_and_line(swept, runner, tmp_path, field, value, message):
    _, out = swept
    records = records_of(out)
    path = tmp_path / "bad.jsonl"
    # the bad record on line 2, followed by a good one: not a half-written last line
    path.write_text(json.dumps(records[0]) + "\n" + bad_record(records[1], field, value) + "\n"
                    + json.dumps(records[2]) + "\n")
    line = one_error_line(runner.invoke(lt_cls, ["table", str(path)]), f"{path}:2", message)
    assert "inf" not in line.replace(str(path), "FILE") and "nan" not in line.lower()


def test_a_bad_record_stops_resume_and_plot_too(swept, runner, tmp_path):
    entry, out = swept
    records = records_of(out)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:-1])
                                       + bad_record(records[-1], "top1", "1e400") + "\n")
    result = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--methods", "joint,tau", "--param", "tau.tau=auto",
                                    "--seeds", "0,1", "--out", str(out), "--quiet", "--resume"])
    one_error_line(result, f"{out / 'results.jsonl'}:{len(records)}", "top1 (beyond the float range)")


def test_overflowing_or_null_metrics_never_print_a_number_that_is_not_one(swept, runner, tmp_path):
    _, out = swept
    records = records_of(out)
    for value in ("1e400", "-1e400", "null"):
        path = tmp_path / f"metric-{value}.jsonl"
        path.write_text("".join(bad_record(r, "top1", value) + "\n" if i == 0 else json.dumps(r) + "\n"
                                for i, r in enumerate(records)))
        for fmt in ("md", "csv", "json", "latex"):
            result = runner.invoke(lt_cls, ["table", str(path), "--format", fmt])
            line = one_error_line(result, f"{path}:1").replace(str(path), "FILE")
            assert "inf" not in line and "nan" not in line.lower()


def test_a_half_written_last_line_is_still_skipped(swept, runner, tmp_path):
    _, out = swept
    records = records_of(out)
    path = write_records(tmp_path / "partial.jsonl", records, tail=json.dumps(records[0])[:40])
    rows = json.loads(invoke(runner, lt_cls, ["table", path, "--format", "json"]).output)
    assert sum(r["seeds"] for r in rows) == len(records)
    # a null (empty-group) Many / Medium / Few is a dash, never a seed
    empty = {**records[0], "few": None, "n_few": 0}
    path = write_records(tmp_path / "empty-group.jsonl", [empty])
    (row,) = json.loads(invoke(runner, lt_cls, ["table", path, "--format", "json"]).output)
    assert row["few"] is None and row["seeds"] == 1
    # but a null group accuracy over a non-empty group is refused
    path = write_records(tmp_path / "null-group.jsonl", [{**records[0], "few": None, "n_few": 3}])
    one_error_line(runner.invoke(lt_cls, ["table", str(path)]), f"{path}:1", "n_few is 3")


def test_bad_seeds_and_empty_grids_are_one_line(swept, runner, tmp_path):
    entry, _ = swept

    def run(name, *args):
        return runner.invoke(lt_cls, ["sweep", "--cache", entry, "--out", str(tmp_path / name), "--quiet",
                                      "--no-plots", *map(str, args)])

    def toml(name, text):
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        return path

    cases = [
        (run("s1", "--methods", "crt", "--seeds", str(2**64)), ["--seeds", "18446744073709551616"]),
        (run("s2", "--methods", "crt", "--seeds", str(10**30)), ["--seeds"]),
        (run("s3", "--methods", "ncm", "--seeds", "-5"), ["--seeds", "-5"]),
        (run("s4", "--methods", "ncm", "--seeds", "1.5"), ["--seeds", "1.5"]),
        (run("s5", "--config", toml("big-seed", f'methods = ["crt"]\nseeds = [{2**64}]\n')), ["--seeds"]),
        (run("s6", "--config", toml("neg-seed", 'methods = ["ncm"]\nseeds = -1\n')), ["--seeds"]),
        (run("g1", "--config", toml("empty", 'methods = ["tau"]\n[params.tau]\ntau = []\n')),
         ["--config", "empty.toml", "[params.tau] tau = []", "empty grid"]),
        (run("g2", "--config", toml("table", 'methods = ["knn"]\n[params.knn]\nk = {a = 1}\n')),
         ["--config", "[params.knn] k is a table"]),
    ]
    for result, needles in cases:
        one_error_line(result, *needles)
    assert not any((tmp_path / name / "results.jsonl").exists() for name in ("s1", "s2", "s5", "g1"))
    # the same from the API: an empty grid names the parameter
    from classifiers.sweep import SweepSpec, expand_grid
    from featcache.errors import FeatcacheError
    with pytest.raises(FeatcacheError, match=r"tau\.tau: no values"):
        expand_grid(SweepSpec(["tau"], params={"tau": {"tau": []}}))


WRONG_DIAGNOSTICS = [
    ("[]", "no JSON object"),
    ('{"representations": []}', "'representations' is not an object"),
    ('{"representations": {"x": 1}}', "representation 'x' is not an object"),
    ('{"representations": {"x": {}}}', "train_counts"),
    ('{"representations": {"x": {"train_counts": "abc"}}}', "train_counts"),
    ('{"representations": {"x": {"train_counts": [1, -2]}}}', "train_counts"),
    ('{"representations": {"x": {"train_counts": [3, 1], "per_class": {"joint": [0.5]}}}}', "per_class['joint']"),
    ('{"representations": {"x": {"train_counts": [3, 1], "per_class": [1, 2]}}}', "per_class is not an object"),
    ('{"representations": {"x": {"train_counts": [3, 1], "weight_norms": {"joint": [1, "a"]}}}}', "weight_norms"),
    ('{"representations": {"x": {"train_counts": [3, 1], "weight_norms": {"joint": [1, NaN]}}}}', "weight_norms"),
    ('{"representations": {"x": {"train_counts": [3, 1], "tau_curve": {"val": {"1.0": 50}}}}}', "tau_curve"),
    ('{"representations": {"x": {"train_counts": [3, 1], "tau_curve": {"chosen": 1, "val": [1]}}}}', "tau_curve['val']"),
    ('{"representations": {"x": {"train_counts": [3, 1], "tau_curve": {"chosen": 1, "val": {"a": 1}}}}}', "tau"),
    ('{"representations": {"x": {"train_counts": [3, 1], "cache_key": 5}}}', "cache_key"),
    ("[" * 100_000, "not JSON"),
]


@pytest.mark.parametrize("text, message", WRONG_DIAGNOSTICS, ids=[t[:60] for t, _ in WRONG_DIAGNOSTICS])
def test_a_wrong_shaped_diagnostics_file_is_one_line_for_plot_and_resume(swept, runner, text, message):
    entry, out = swept
    (out / "diagnostics.json").write_text(text)
    one_error_line(runner.invoke(lt_cls, ["plot", str(out)]), str(out / "diagnostics.json"), "damaged", message)
    resume = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--methods", "joint,tau,ncm", "--param",
                                    "tau.tau=auto", "--seeds", "0,1", "--out", str(out), "--quiet", "--resume"])
    one_error_line(resume, str(out / "diagnostics.json"), "damaged", message)


def test_the_sweeps_own_diagnostics_pass_the_check(swept, runner):
    _, out = swept
    from classifiers.records import check_diagnostics
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["representations"]["bad-inputs"]["tau_curve"]
    assert check_diagnostics(diagnostics) is None
    assert invoke(runner, lt_cls, ["plot", out]).output.strip()


def closed_early(args, stdin=None):
    """Run ``lt-cls ARGS`` with its stdout a pipe whose reader is gone before it writes."""
    process = subprocess.Popen([sys.executable, "-m", "classifiers", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader closes before the command has printed anything
    err = process.stderr.read().decode()
    process.stderr.close()
    return process.wait(), err


def test_a_closed_stdout_ends_quietly(swept, tmp_path):
    _, out = swept
    for args in (["list"], ["--help"], ["--version"], ["table", "--help"], ["table", out / "results.jsonl"],
                 ["table", out, "--format", "json"]):
        code, err = closed_early(args)
        assert code in (0, 141, -13), (args, code, err)  # 141: the shell's status of a SIGPIPE death
        assert err == "", (args, err)
    # through a real pipe into a reader that stops after one line
    done = subprocess.run(f"{sys.executable} -m classifiers list | head -1", shell=True, capture_output=True,
                          text=True, check=True)
    assert len(done.stdout.splitlines()) == 1 and done.stderr == ""
