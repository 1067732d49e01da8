"""Crash safety, concurrency, integrity and one-line errors for bad input."""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from cli.featcache_cmd import main as featcache
from cli.lt_cls_cmd import main as lt_cls
from featcache import FeatureCache
from featcache.errors import FeatcacheError
from tests.conftest import invoke

POINTS = ["first-shard", "mid-shard", "between-shards", "before-rename", "before-manifest", "manifest-replace",
          "second-split"]
EXTRACT = ["extract", "--data", "digits-lt", "--shard-rows", "100", "--quiet"]


def harness(point, ckpt, cache, timeout=120):
    env = {**os.environ, "FEATCACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tests.kill_harness", point, *EXTRACT, "--ckpt", str(ckpt)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def visible_state(cache):
    """What a reader can see: {split: features} of every complete entry under ``cache``."""
    out = {}
    for manifest in cache.glob("*/manifest.json"):
        entry = FeatureCache.open(manifest.parent)
        for split in entry.splits:
            out[split] = entry.split(split)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted extraction with the same checkpoint (one thread, as in the harness)."""
    from featcache.backbones import build_model
    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    ckpt = root / "tiny.pt"
    torch.save({"arch": "tinycnn", "state_dict": build_model("tinycnn", 10, 1).state_dict()}, ckpt)
    done = harness("none", ckpt, root / "cache")
    assert done.returncode == 0, done.stderr
    entry = FeatureCache.open(done.stdout.split()[-1])
    return ckpt, {s: entry.split(s) for s in entry.splits}


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_never_leaves_a_readable_incomplete_entry_and_resume_is_bit_identical(point, reference, tmp_path):
    ckpt, expected = reference
    cache = tmp_path / "cache"
    killed = harness(point, ckpt, cache)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for split, data in visible_state(cache).items():  # whatever is visible is complete and right
        np.testing.assert_array_equal(data.features, expected[split].features)
    if point == "second-split":
        assert len(visible_state(cache)) == 1
    elif point not in ("first-shard",):
        assert visible_state(cache) == {}
    kept = {p: p.stat().st_mtime_ns for p in cache.glob("*/*/shard-*.h5")}
    resumed = harness("none", ckpt, cache)
    assert resumed.returncode == 0, resumed.stderr
    entry = FeatureCache.open(resumed.stdout.split()[-1])
    assert sorted(entry.splits) == sorted(expected) and entry.verify() == []
    for split, data in expected.items():
        np.testing.assert_array_equal(entry.split(split).features, data.features)
        np.testing.assert_array_equal(entry.split(split).labels, data.labels)
        np.testing.assert_array_equal(entry.split(split).indices, data.indices)
    for path, mtime in kept.items():  # verified complete shards were kept, not rewritten
        assert path.stat().st_mtime_ns == mtime
    assert not list(cache.rglob(".*tmp-*")) and not list(cache.glob("*/*/shard-*.json"))


def test_sigkill_at_random_times(reference, tmp_path):
    ckpt, expected = reference
    env = {**os.environ, "FEATCACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cli.featcache_cmd", *EXTRACT, "--shard-rows", "20", "--ckpt", str(ckpt)]
    rng = np.random.default_rng(0)
    for delay in rng.uniform(2.0, 5.0, size=3):
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        for split, data in visible_state(tmp_path / "cache").items():
            np.testing.assert_array_equal(data.features, expected[split].features)
    final = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    entry = FeatureCache.open(final.stdout.split()[-1])
    for split, data in expected.items():
        np.testing.assert_array_equal(entry.split(split).features, data.features)


def test_two_concurrent_extracts_make_one_entry(reference, tmp_path):
    ckpt, expected = reference
    env = {**os.environ, "FEATCACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.kill_harness", "none", *EXTRACT, "--ckpt", str(ckpt)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert outputs[0][0].split()[-1] == outputs[1][0].split()[-1]
    assert sum("WORKED" in err for _, err in outputs) == 1  # the other waited on the lock and reused
    entries = list((tmp_path / "cache").glob("*/manifest.json"))
    assert len(entries) == 1
    entry = FeatureCache.open(entries[0].parent)
    assert entry.verify() == []
    for split, data in expected.items():
        np.testing.assert_array_equal(entry.split(split).features, data.features)


def test_disk_full_removes_temporaries_and_leaves_no_entry(tiny_ckpt, cache_dir, runner, monkeypatch):
    from featcache import store
    original = store.SplitWriter._write_h5
    calls = []

    def full(self, path, *args):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path, *args)
    monkeypatch.setattr(store.SplitWriter, "_write_h5", full)
    result = runner.invoke(featcache, ["extract", "--ckpt", str(tiny_ckpt), "--data", "digits-lt", "--shard-rows",
                                       "100", "--quiet"])
    assert result.exit_code == 1 and "disk full" in result.output and len(result.output.strip().splitlines()) == 1
    assert not any(p.is_file() for p in cache_dir.rglob("*") if ".locks" not in p.parts)


def test_corrupt_shard_is_refused_on_read(tiny_ckpt, cache_dir, runner):
    path = invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--quiet"]).output.split()[-1]
    shard = next(p for p in (cache_dir.glob("*/train/shard-00000.h5")))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 1
    shard.write_bytes(bytes(data))
    result = runner.invoke(lt_cls, ["sweep", "--cache", path, "--methods", "ncm", "--out", str(cache_dir / "s"),
                                    "--quiet"])
    assert result.exit_code == 1 and "shard-00000.h5" in result.output and "checksum" in result.output


# -- bad input: one line, exit != 0, nothing half-written --------------------------------------


@pytest.fixture
def bad_inputs(tmp_path, image_tree):
    (tmp_path / "not-a-ckpt.pt").write_text("hello")
    (tmp_path / "a-directory.pt").mkdir()
    (tmp_path / "list.txt").write_text("train/class0/img0.png 0\nthis line is broken\n")
    (tmp_path / "labels.txt").write_text("train/class0/img0.png 0\ntrain/class1/img0.png 7\n")
    (tmp_path / "empty.txt").write_text("")
    (image_tree / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    from featcache.backbones import build_model
    model = build_model("tinycnn", 10, 1)
    with torch.no_grad():
        model.features[0].weight.fill_(float("nan"))
    torch.save({"arch": "tinycnn", "state_dict": model.state_dict()}, tmp_path / "nan.pt")
    from torchvision.models import resnet18
    torch.save(resnet18(num_classes=3).state_dict(), tmp_path / "r18-3.pt")
    return tmp_path


BAD = {
    "missing checkpoint": (["extract", "--ckpt", "{t}/nope.pt", "--data", "digits-lt"], "nope.pt does not exist"),
    "unreadable checkpoint": (["extract", "--ckpt", "{t}/a-directory.pt", "--data", "digits-lt"], "cannot be read"),
    "not a checkpoint": (["extract", "--ckpt", "{t}/not-a-ckpt.pt", "--data", "digits-lt"], "not a PyTorch checkpoint"),
    "other arch": (["extract", "--ckpt", "{ckpt}", "--arch", "resnet18", "--data", "digits-lt"], "missing keys"),
    "data root missing": (["extract", "--ckpt", "{ckpt}", "--data", "fashion-mnist-lt", "--data-root", "{t}/nowhere"],
                          "--data-root {t}/nowhere does not exist"),
    "malformed list line": (["extract", "--ckpt", "{t}/r18-3.pt", "--arch", "resnet18", "--data", "txt", "--data-root",
                             "{images}", "--list", "train={t}/list.txt"], "list.txt:2"),
    "label out of range": (["extract", "--ckpt", "{t}/r18-3.pt", "--arch", "resnet18", "--data", "txt", "--data-root",
                            "{images}", "--list", "train={t}/labels.txt"], "label 7, out of range"),
    "undecodable image": (["extract", "--ckpt", "{t}/r18-3.pt", "--arch", "resnet18", "--data", "imagefolder",
                           "--data-root", "{images}", "--crop", "32", "--resize", "36"], "broken.png"),
    "empty split": (["extract", "--ckpt", "{t}/r18-3.pt", "--arch", "resnet18", "--data", "txt", "--data-root",
                     "{images}", "--list", "train={t}/empty.txt"], "empty.txt (split 'train') is empty"),
    "nan features": (["extract", "--ckpt", "{t}/nan.pt", "--data", "digits-lt"], "non-finite features"),
    "unknown data": (["extract", "--ckpt", "{ckpt}", "--data", "imagenet"], "unknown --data 'imagenet'; choose one of digits-lt"),
    "unknown split": (["extract", "--ckpt", "{ckpt}", "--data", "digits-lt", "--split", "holdout"], "no split 'holdout'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_naming_the_culprit(case, bad_inputs, image_tree, tiny_ckpt, cache_dir, runner):
    args, message = BAD[case]
    fill = {"t": bad_inputs, "ckpt": tiny_ckpt, "images": image_tree}
    result = runner.invoke(featcache, [a.format(**fill) for a in args])
    assert result.exit_code != 0
    lines = [line for line in result.output.replace("\r", "\n").strip().splitlines() if line.strip() and "img/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message.format(**fill) in lines[0], result.output
    assert "Traceback" not in result.output
    assert not list(cache_dir.glob("*/manifest.json")) and not [p for p in cache_dir.glob("*") if p.name != ".locks"]


def test_debug_shows_the_traceback(runner, tmp_path):
    result = runner.invoke(featcache, ["--debug", "extract", "--ckpt", str(tmp_path / "nope.pt"), "--data", "digits-lt"])
    assert isinstance(result.exception, FeatcacheError)


def test_skip_bad_images_with_a_warning(bad_inputs, image_tree, cache_dir, runner):
    result = runner.invoke(featcache, ["extract", "--ckpt", str(bad_inputs / "r18-3.pt"), "--arch", "resnet18",
                                       "--data", "imagefolder", "--data-root", str(image_tree), "--crop", "32",
                                       "--resize", "36", "--on-bad-image", "skip", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 undecodable image(s)" in result.output and "broken.png" in result.output
    assert FeatureCache.open(result.stdout.split()[-1]).class_counts("train").tolist() == [5, 3, 1]


@pytest.fixture
def features(tmp_path):
    rng = np.random.default_rng(0)
    made = {}
    for name, dim, labels in (("a", 4, [0, 1, 2, 0]), ("b", 5, [0, 1, 2, 1]), ("nolast", 4, [0, 1, 0, 1])):
        made[name] = tmp_path / f"{name}.npz"
        np.savez(made[name], features=rng.normal(size=(4, dim)).astype(np.float32), labels=np.array(labels))
    bad = rng.normal(size=(4, 4)).astype(np.float32)
    bad[1, 2] = np.inf
    made["inf"] = tmp_path / "inf.pkl"
    with open(made["inf"], "wb") as handle:
        pickle.dump({"feats": bad, "labels": np.array([0, 1, 2, 0])}, handle)
    torch.save({"fc.weight": torch.ones(3, 5), "fc.bias": torch.zeros(3)}, tmp_path / "clf5.pt")
    made["clf5"] = tmp_path / "clf5.pt"
    return made


@pytest.mark.parametrize("args, message", [
    (["--split", "train={a}", "--split", "test={b}"], "feature-dim mismatch between splits"),
    (["--split", "train={a}", "--classifier", "{clf5}"], "classifier in"),
    (["--split", "train={inf}"], "NaN or Inf"),
])
def test_bad_import_input(features, cache_dir, runner, args, message):
    result = runner.invoke(featcache, ["import", "--name", "x"] + [a.format(**features) for a in args])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not [p for p in cache_dir.glob("*") if p.name != ".locks"]


def imported(runner, features, *splits):
    args = ["import", "--name", "-".join(splits)]
    for split in splits:
        name, key = split.split("=")
        args += ["--split", f"{name}={features[key]}"]
    return invoke(runner, featcache, args).output.split()[-1]


def test_sweep_errors(features, cache_dir, runner, tmp_path):
    no_val = imported(runner, features, "train=a", "test=a")
    result = runner.invoke(lt_cls, ["sweep", "--cache", no_val, "--methods", "ncm", "--param", "ncm.metric=l1",
                                    "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1 and "metric='l1'" in result.output
    clf_entry = invoke(runner, featcache, ["import", "--name", "c", "--split", f"train={features['b']}",
                                           "--split", f"test={features['b']}", "--classifier", features["clf5"]]).output.split()[-1]
    result = runner.invoke(lt_cls, ["sweep", "--cache", clf_entry, "--methods", "tau", "--param", "tau.tau=auto",
                                    "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1 and "tau='auto' needs a validation split" in result.output
    missing_class = imported(runner, features, "train=nolast", "test=a")
    result = runner.invoke(lt_cls, ["sweep", "--cache", missing_class, "--methods", "ncm", "--out", str(tmp_path / "o"),
                                    "--quiet"])
    assert result.exit_code == 1 and "class 2 has no training samples" in result.output


def test_unknown_format_version_through_the_cli(features, cache_dir, runner):
    path = imported(runner, features, "train=a")
    manifest = json.loads((cache_dir / path.split("/")[-1] / "manifest.json").read_text())
    manifest["format_version"] = 99
    (cache_dir / path.split("/")[-1] / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(featcache, ["info", path])
    assert result.exit_code == 1 and "format_version 99" in result.output and len(result.output.strip().splitlines()) == 1
