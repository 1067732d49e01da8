"""Stage 1: samplers as defined, train -> extract with no flags, resume, data-set determinism."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cli.featcache_cmd import main as featcache
from featcache import FeatureCache
from featcache.datasets import DataSpec, long_tail_counts
from featcache.errors import FeatcacheError
from featcache.sampling import class_probabilities
from featcache.train import TrainConfig, train
from tests.conftest import invoke

FEATCACHE = [sys.executable, "-m", "cli.featcache_cmd"]


def within_sampling_error(histogram, probs, sigmas=5.0):
    n = histogram.sum()
    return np.all(np.abs(histogram / n - probs) <= sigmas * np.sqrt(probs * (1 - probs) / n) + 1e-12)


@pytest.mark.parametrize("sampler", ["instance", "class", "sqrt", "progressive"])
def test_logged_draw_histogram_matches_the_sampler(sampler, tmp_path, runner):
    out = tmp_path / sampler
    invoke(runner, featcache, ["train", "--data", "digits-lt", "--arch", "tinycnn", "--sampler", sampler,
                               "--epochs", "4", "--epoch-draws", "3000", "--out", out, "--quiet"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    counts = np.array(long_tail_counts(10, 120, 30.0, "exp"))
    assert len(log) == 4
    for epoch, record in enumerate(log):
        histogram = np.array(record["class_draws"])
        assert histogram.sum() == 3000
        assert within_sampling_error(histogram, class_probabilities(counts, sampler, epoch, 4)), (epoch, histogram)
    if sampler == "progressive":  # moves from instance- towards class-balanced
        assert log[0]["class_draws"][0] > 2 * log[-1]["class_draws"][0]
        assert log[0]["class_draws"][-1] < log[-1]["class_draws"][-1]


def test_sampler_definitions():
    counts = np.array([100, 25, 4])
    assert np.allclose(class_probabilities(counts, "instance"), counts / 129)
    assert np.allclose(class_probabilities(counts, "class"), [1 / 3] * 3)
    assert np.allclose(class_probabilities(counts, "sqrt"), np.array([10, 5, 2]) / 17)
    assert np.allclose(class_probabilities(counts, "progressive", 1, 4),
                       0.75 * counts / 129 + 0.25 / 3)
    assert class_probabilities(np.array([5, 0, 5]), "class").tolist() == [0.5, 0.0, 0.5]


def test_train_then_extract_with_no_other_flags(tmp_path, cache_dir, runner):
    out = tmp_path / "run"
    last = invoke(runner, featcache, ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "2",
                                      "--out", out, "--quiet"]).output.strip().splitlines()[-1]
    assert (out / "best.pt").is_file()
    state = torch.load(last, weights_only=True)
    assert state["arch"] == "tinycnn" and state["class_counts"] == long_tail_counts(10, 120, 30.0, "exp")
    assert len(state["train_ids"]) == sum(state["class_counts"])
    entry = FeatureCache.open(invoke(runner, featcache, ["extract", "--ckpt", last, "--quiet"]).output.split()[-1])
    assert sorted(entry.splits) == ["test", "train", "val"]
    assert entry.split("train").indices.tolist() == state["train_ids"].tolist()
    np.testing.assert_array_equal(entry.classifier[0], state["state_dict"]["fc.weight"].numpy())


def test_kill_and_resume_reaches_the_same_weights(tmp_path):
    args = ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "4", "--epoch-draws", "6000",
            "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(FEATCACHE + args + [str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(FEATCACHE + args + [str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 3
    subprocess.run(FEATCACHE + args + [str(killed), "--resume"], check=True, env=env, capture_output=True)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["state_dict"]
    resumed = torch.load(killed / "last.pt", weights_only=True)["state_dict"]
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_data_options_are_deterministic_and_follow_the_profile():
    options = {"imbalance": 10.0, "max_per_class": 100, "val_per_class": 5, "test_per_class": 20}
    a = DataSpec("digits-lt", None, options).load()
    b = DataSpec("digits-lt", None, options).load()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[split].ids, b.splits[split].ids)
    assert a.splits["train"].class_counts(10).tolist() == long_tail_counts(10, 100, 10.0, "exp")
    shuffled = [DataSpec("digits-lt", None, {**options, "class_order": "shuffled", "order_seed": s}).load()
                for s in (1, 2)]
    orders = [np.argsort(-s.splits["train"].class_counts(10), kind="stable").tolist() for s in shuffled]
    assert orders[0] != orders[1]
    assert sorted(shuffled[0].splits["train"].class_counts(10).tolist(), reverse=True) == long_tail_counts(10, 100, 10.0, "exp")
    assert set(a.splits["val"].ids).isdisjoint(a.splits["train"].ids)
    assert set(a.splits["test"].ids).isdisjoint(a.splits["train"].ids)
    step = DataSpec("digits-lt", None, {**options, "profile": "step"}).load()
    assert step.splits["train"].class_counts(10).tolist() == [100] * 5 + [10] * 5


def test_train_config_is_keyword_only_and_records_the_same_args():
    with pytest.raises(TypeError):
        TrainConfig(DataSpec("digits-lt"), "tinycnn", "runs/x")
    config = TrainConfig(data=DataSpec("digits-lt"), arch="tinycnn", out="runs/x")
    assert list(config.to_dict()) == ["data", "arch", "out", "sampler", "epochs", "batch_size", "lr", "weight_decay",
                                      "momentum", "seed", "device", "epoch_draws", "augment", "num_workers", "resume",
                                      "progress", "init"]


def test_train_refuses_a_misspelled_data_option_before_writing(tmp_path, runner, image_tree):
    config = TrainConfig(data=DataSpec("digits-lt", options={"imbalanse": 2.0}), arch="tinycnn", out=str(tmp_path / "a"))
    with pytest.raises(FeatcacheError, match=r"^data set 'digits-lt' has no option 'imbalanse' \(did you mean "
                                             r"'imbalance'\?\)"):
        train(config)
    result = runner.invoke(featcache, ["train", "--data", "imagefolder", "--data-root", str(image_tree), "--imbalance",
                                       "10", "--arch", "tinycnn", "--out", str(tmp_path / "b")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines == ["Error: data set 'imagefolder' has no option 'imbalance'; "
                                               "its options: resize, crop, hash_images"], result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATCACHE_DIR": str(tmp_path / "cache-dist")}
    torchrun = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "cli.featcache_cmd"]
    run = tmp_path / "run"
    subprocess.run(torchrun + ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "2", "--quiet",
                               "--out", str(run)], check=True, env=env, capture_output=True, timeout=300)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "log.jsonl"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    distributed = subprocess.run(torchrun + ["extract", "--ckpt", str(run / "last.pt"), "--shard-rows", "64",
                                             "--quiet"], check=True, env=env, capture_output=True, text=True,
                                 timeout=300).stdout.split()[-1]
    single = subprocess.run(FEATCACHE + ["extract", "--ckpt", str(run / "last.pt"), "--shard-rows", "64", "--quiet",
                                         "--cache-dir", str(tmp_path / "cache-single")], check=True, env=env,
                            capture_output=True, text=True, timeout=300).stdout.split()[-1]
    a, b = FeatureCache.open(distributed), FeatureCache.open(single)
    assert a.key == b.key and sorted(a.splits) == sorted(b.splits)
    for split in a.splits:
        np.testing.assert_array_equal(a.split(split).features, b.split(split).features)
        np.testing.assert_array_equal(a.split(split).indices, b.split(split).indices)
        assert [s["rows"] for s in a.meta["splits"][split]["shards"]] == [s["rows"] for s in b.meta["splits"][split]["shards"]]


def test_python_m_entry_points_run_both_commands_and_under_torchrun(tmp_path):
    """``python -m featcache`` / ``python -m classifiers`` are the two command lines (torchrun needs a
    module: a console script may be a shell shim, as under pyenv)."""
    env = {**os.environ, "FEATCACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    listed = subprocess.run([sys.executable, "-m", "classifiers", "list"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and listed.stdout.startswith("joint"), listed.stderr
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    ranks = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "featcache", "ls"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    assert ranks.stdout.lower().count(f"no entries under {tmp_path / 'cache'}") == 2


def test_a_run_folder_is_never_restarted_or_appended_to_without_being_asked(tmp_path, runner):
    run = tmp_path / "run"
    args = ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "1", "--quiet", "--out", str(run)]
    invoke(runner, featcache, args)
    (run / "notes.txt").write_text("mine")
    log = (run / "log.jsonl").read_text()
    again = runner.invoke(featcache, args)
    assert again.exit_code == 1 and "already holds a run" in again.output and "--overwrite" in again.output
    assert (run / "log.jsonl").read_text() == log
    longer = runner.invoke(featcache, args[:-2] + ["--out", str(run), "--resume", "--epochs", "3"])
    assert longer.exit_code == 1 and "--epochs 1, not 3" in longer.output and "schedule" in longer.output
    invoke(runner, featcache, args + ["--overwrite"])
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # started over, not appended to
    assert (run / "notes.txt").read_text() == "mine"  # what the run did not write is kept
    finished = runner.invoke(featcache, args + ["--resume"], catch_exceptions=False)
    assert finished.exit_code == 0 and "nothing left to train" in finished.stderr


def test_resume_says_from_which_epoch(tmp_path, runner):
    run = tmp_path / "run"
    args = ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "3", "--epoch-draws", "64", "--quiet",
            "--out", str(run)]
    invoke(runner, featcache, args)
    state = torch.load(run / "last.pt", weights_only=True)
    state["epoch"] = 0  # as if stopped after the first epoch
    torch.save(state, run / "last.pt")
    resumed = runner.invoke(featcache, args + ["--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0 and f"resuming from epoch 2 of 3 ({run / 'last.pt'})" in resumed.stderr
