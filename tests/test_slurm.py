"""Sweeps through the slurm executor, against a real single-node SLURM (tests/slurm/start.sh, which
.ci/run calls): the records equal a local sweep's, a cancelled array task leaves failed records that
name its job and --resume completes the study; readers of a shared cache while a writer commits."""
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from classifiers.records import METRIC_FIELDS, load_records, record_key
from cli.lt_cls_cmd import main as lt_cls
from featcache.store import FeatureCache, writing
from tests.conftest import invoke

ROOT = Path(__file__).resolve().parent.parent


def _slurm_answers() -> str | None:
    """Why SLURM cannot be used here, or None."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (.ci/run installs and starts it: bash tests/slurm/start.sh)"
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if state.returncode != 0 or not any(s.strip().startswith(("idle", "mixed", "alloc")) for s in state.stdout.split()):
        return f"no SLURM node is up (sinfo: {' '.join((state.stdout + state.stderr).split())[:200]})"
    return None


needs_slurm = pytest.mark.skipif(_slurm_answers() is not None, reason=str(_slurm_answers()))


def _entry(root: Path, key: str, seed: int) -> Path:
    """A small long-tailed entry with a head-biased classifier (train / val / test)."""
    rng = np.random.default_rng(seed)
    classes, dim = 6, 16
    centres = rng.normal(size=(classes, dim)).astype(np.float32) * 2.5
    counts = {"train": [80, 40, 20, 10, 6, 4], "val": [5] * classes, "test": [20] * classes}
    with writing(root, key, {"kind": "test", "name": key, "feature_dim": dim, "dtype": "float32",
                             "num_classes": classes}) as entry:
        weight = centres + rng.normal(size=centres.shape).astype(np.float32)
        entry.write_classifier(weight, np.log(np.asarray(counts["train"], np.float32)))
        for split, per_class in counts.items():
            labels = np.repeat(np.arange(classes), per_class)
            features = centres[labels] + rng.normal(size=(len(labels), dim)).astype(np.float32) * 1.5
            entry.write_split(split, features, labels)
    return entry.path


@pytest.fixture
def two_entries(tmp_path):
    return [_entry(tmp_path / "cache", f"rep{seed}", seed) for seed in (0, 1)]


def _sweep_args(entries, out, *extra):
    return ["sweep", *[a for e in entries for a in ("--cache", str(e))], "--methods", "joint,ncm,crt",
            "--seeds", "0,1", "--out", str(out), "--quiet", *extra]


def _by_key(records):
    return {record_key(r): r for r in records}


@needs_slurm
def test_slurm_sweep_equals_the_local_sweep(two_entries, tmp_path, runner):
    invoke(runner, lt_cls, _sweep_args(two_entries, tmp_path / "local"))
    invoke(runner, lt_cls, _sweep_args(two_entries, tmp_path / "slurm", "--executor", "slurm",
                                       "--slurm-runs-per-task", "2", "--slurm-time", "10"))
    local = _by_key(load_records(tmp_path / "local" / "results.jsonl"))
    slurm = load_records(tmp_path / "slurm" / "results.jsonl")
    assert len(slurm) == len(local) == 2 * 3 * 2 and _by_key(slurm).keys() == local.keys()
    jobs = {r["job"]["id"].split("_")[0] for r in slurm}
    tasks = {r["job"]["id"] for r in slurm}
    assert len(jobs) == 1 and len(tasks) >= 3  # one job array, several tasks
    for record in slurm:
        reference = local[record_key(record)]
        assert record["status"] == reference["status"] == "ok"
        for field in METRIC_FIELDS:
            if reference[field] is None:
                assert record[field] is None
            else:
                assert abs(record[field] - reference[field]) <= 1e-9, (field, record, reference)
    parts = list((tmp_path / "slurm" / "parts").glob("*.jsonl"))
    assert len(parts) == len(tasks) and sum(len(load_records(p)) for p in parts) == len(slurm)
    assert json.loads((tmp_path / "slurm" / "diagnostics.json").read_text())["representations"].keys() == \
        {"rep0", "rep1"}


@needs_slurm
def test_a_tuned_slurm_sweep_makes_the_local_choices(two_entries, tmp_path, runner):
    """The trials run in array tasks; the submitter chooses once every trial is merged."""
    tuned = ("--methods", "joint,crt", "--tune", "--budget", "3", "--no-plots")
    invoke(runner, lt_cls, ["sweep", "--cache", str(two_entries[0]), "--seeds", "0,1", "--out", str(tmp_path / "l"),
                            "--quiet", *tuned])
    invoke(runner, lt_cls, ["sweep", "--cache", str(two_entries[0]), "--seeds", "0,1", "--out", str(tmp_path / "s"),
                            "--quiet", *tuned, "--executor", "slurm", "--slurm-runs-per-task", "3",
                            "--slurm-time", "10"])
    here, there = (_by_key(load_records(tmp_path / name / "results.jsonl")) for name in ("l", "s"))
    assert here.keys() == there.keys() and len(here) == 2 * (1 + 3) + 2 * 2
    for key, record in there.items():
        assert record["params"] == here[key]["params"] and record["tuning"]["role"] == here[key]["tuning"]["role"]
        assert abs(record["top1"] - here[key]["top1"]) <= 1e-9
        assert (record["job"] is None) == (record["tuning"]["role"] == "selected")


@needs_slurm
def test_a_cancelled_array_task_leaves_failed_records_and_resume_completes_the_study(two_entries, tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "classifiers", *_sweep_args(two_entries, out, "--executor", "slurm",
                                                                 "--slurm-runs-per-task", "3",
                                                                 "--slurm-array-parallelism", "1")]
    env = {**os.environ, "FEATCACHE_DIR": str(tmp_path / "cache")}
    sweep = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cancelled = None
    deadline = time.monotonic() + 120
    while cancelled is None and time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i"], capture_output=True,
                                text=True).stdout.split()
        if queued:  # the array's last task, still pending behind the parallelism of 1
            cancelled = max(queued, key=lambda job: int(job.split("_")[1]))
            subprocess.run(["scancel", cancelled], check=True)
        time.sleep(0.2)
    stdout, stderr = sweep.communicate(timeout=300)
    assert cancelled is not None, "no pending array task to cancel"
    assert sweep.returncode == 1, (stdout, stderr)
    assert "failed" in stderr and "--resume" in stderr
    records = load_records(out / "results.jsonl")
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 12 and len(failed) == 3
    for record in failed:
        assert record["job"]["id"] == cancelled and record["job"]["lost"] is True
        assert f"SLURM job {cancelled}" in record["failure"] and record["job"]["log"] in record["failure"]
        assert all(record[field] is None for field in METRIC_FIELDS)
    resumed = subprocess.run([*command, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = load_records(out / "results.jsonl")
    keys = [record_key(r) for r in final]
    assert len(final) == 12 and len(set(keys)) == 12 and all(r["status"] == "ok" for r in final)


def test_slurm_executor_without_slurm_is_one_line_that_says_how_to_run_locally(two_entries, tmp_path, runner,
                                                                               monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = runner.invoke(lt_cls, _sweep_args(two_entries, tmp_path / "out", "--executor", "slurm"))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "no SLURM" in lines[0] and "--executor local" in lines[0]
    assert not (tmp_path / "out" / "results.jsonl").exists()


def _read_many_times(path: str, expected: dict, times: int, errors) -> None:
    try:
        for _ in range(times):
            cache = FeatureCache.open(path)
            for split, (features, labels) in expected.items():
                got = cache.split(split)
                if not (np.array_equal(got.features, features) and np.array_equal(got.labels, labels)):
                    errors.put(f"{split}: other rows read")
    except Exception as exc:  # reported to the test, which fails with it
        errors.put(repr(exc))


def _commit_entries(root: str, count: int) -> None:
    for index in range(count):
        _entry(Path(root), f"writer{index}", 100 + index)


def test_two_readers_of_an_entry_while_a_third_process_commits_another(tmp_path):
    """Readers open HDF5 without file locking (as on NFS) and only follow manifests, which are
    replaced atomically: two processes reading one entry while a third commits others see only the
    rows written, with no error."""
    entry = _entry(tmp_path / "cache", "shared", 7)
    cache = FeatureCache.open(entry)
    expected = {split: (cache.split(split).features.copy(), cache.split(split).labels.copy())
                for split in ("train", "val", "test")}
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    readers = [context.Process(target=_read_many_times, args=(str(entry), expected, 60, errors)) for _ in range(2)]
    writer = context.Process(target=_commit_entries, args=(str(tmp_path / "cache"), 6))
    for process in (*readers, writer):
        process.start()
    for process in (*readers, writer):
        process.join(timeout=300)
        assert process.exitcode == 0
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []
    assert all(FeatureCache.open(tmp_path / "cache" / f"writer{i}").verify() == [] for i in range(6))


@needs_slurm
def test_resume_after_the_submitting_process_was_killed_uses_the_parts_on_disk(two_entries, tmp_path):
    """The submitter dies while the array runs: the tasks finish on their own, their parts hold the
    records, and --resume merges them and runs only what no part recorded."""
    out = tmp_path / "study"
    command = [sys.executable, "-m", "classifiers", *_sweep_args(two_entries, out, "--executor", "slurm",
                                                                 "--slurm-runs-per-task", "3",
                                                                 "--slurm-array-parallelism", "1")]
    env = {**os.environ, "FEATCACHE_DIR": str(tmp_path / "cache")}
    submitter = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(load_records(p) for p in (out / "parts").glob("*.jsonl")):
        time.sleep(0.2)
    submitter.kill()
    submitter.wait()
    while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline + 180, "the array did not finish"
        time.sleep(0.5)
    recorded = {record_key(r) for p in (out / "parts").glob("*.jsonl") for r in load_records(p)}
    assert len(recorded) == 12  # every task ran to its end without the submitter
    parts_before = set((out / "parts").glob("*.jsonl"))
    resumed = subprocess.run([*command, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = load_records(out / "results.jsonl")
    assert sorted(record_key(r) for r in final) == sorted(recorded)
    assert set((out / "parts").glob("*.jsonl")) == parts_before  # nothing was submitted again
