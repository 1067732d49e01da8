"""Augmented views in the cache (issue 17): `featcache extract --views K`, format version 2, and
Stage 2 SGD methods drawing among the views."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli.featcache_cmd import main as featcache
from cli.lt_cls_cmd import main as lt_cls
from featcache import FeatureCache
from featcache.batches import view_uniforms
from featcache.store import sha256_file
from tests.conftest import invoke

DIGITS = ["extract", "--data", "digits-lt", "--quiet"]
VIEWS = ["--views", "3", "--train-transform", "crop-flip"]


def extract(runner, ckpt, *args) -> FeatureCache:
    result = invoke(runner, featcache, [*DIGITS, "--ckpt", ckpt, *args])
    return FeatureCache.open(result.output.strip().splitlines()[-1])


@pytest.fixture
def entries(tiny_ckpt, cache_dir, runner):
    return extract(runner, tiny_ckpt), extract(runner, tiny_ckpt, *VIEWS)


def test_three_views_hold_view_zero_bit_for_bit_and_augmented_views(entries):
    single, multi = entries
    assert single.key != multi.key
    assert multi.meta["format_version"] == 2 and multi.num_views("train") == 3
    one, every = single.split("train"), multi.split("train", view=None)
    n = len(one)
    assert len(every) == 3 * n and multi.meta["splits"]["train"]["rows"] == 3 * n
    np.testing.assert_array_equal(every.views, np.repeat([0, 1, 2], n))
    stack = every.view_stack()
    assert stack.shape == (3, n, one.features.shape[1])
    np.testing.assert_array_equal(stack[0], one.features)  # bit for bit
    np.testing.assert_array_equal(multi.split("train").features, one.features)  # view=0 is the default
    for view in (1, 2):
        np.testing.assert_array_equal(multi.split("train", view=view).indices, one.indices)
        np.testing.assert_array_equal(multi.split("train", view=view).labels, one.labels)
        assert (stack[view] != stack[0]).any(axis=1).mean() > 0.5
    assert (stack[1] != stack[2]).any(axis=1).mean() > 0.5
    np.testing.assert_array_equal(multi.class_counts("train"), single.class_counts("train"))
    assert multi.class_counts("train").sum() == n
    for split in ("val", "test"):  # other splits keep one view
        assert multi.num_views(split) == 1
        np.testing.assert_array_equal(multi.split(split).features, single.split(split).features)
    with h5py.File(multi.path / "train" / "shard-00000.h5") as handle:
        assert handle["views"].fletcher32 and handle.attrs["format_version"] == 2
    assert multi.verify() == []


def test_views_and_their_augmentation_are_in_the_key(tiny_ckpt, cache_dir, runner, entries):
    keys = {entries[0].key, entries[1].key,
            extract(runner, tiny_ckpt, "--views", "3", "--train-transform", "flip").key,
            extract(runner, tiny_ckpt, *VIEWS, "--view-seed", "1").key,
            extract(runner, tiny_ckpt, "--views", "2", "--train-transform", "crop-flip").key}
    assert len(keys) == 5
    assert extract(runner, tiny_ckpt, *VIEWS).path == entries[1].path  # a hit


def test_a_data_set_without_augmentation_needs_a_train_transform(tiny_ckpt, cache_dir, runner):
    result = runner.invoke(featcache, [*DIGITS, "--ckpt", str(tiny_ckpt), "--views", "2"])
    assert result.exit_code == 1 and "--train-transform" in result.output
    result = runner.invoke(featcache, [*DIGITS, "--ckpt", str(tiny_ckpt), "--views", "2", "--train-transform",
                                       "official"])
    assert result.exit_code == 1 and "does not apply" in result.output
    assert not any(cache_dir.glob("*/manifest.json"))


def test_view_randomness_is_a_function_of_seed_sample_and_view():
    ids = np.arange(1000)
    u = view_uniforms(0, ids, 1, 3)
    assert u.shape == (1000, 3) and (u >= 0).all() and (u < 1).all() and abs(u.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(view_uniforms(0, ids[500:], 1, 3), u[500:])  # batch-independent
    assert not np.array_equal(view_uniforms(0, ids, 2, 3), u) and not np.array_equal(view_uniforms(1, ids, 1, 3), u)


def test_imagefolder_views_use_the_official_training_transform(image_tree, cache_dir, runner, tmp_path):
    from featcache.backbones import build_model
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny3.pt"
    torch.save({"arch": "tinycnn", "state_dict": build_model("tinycnn", 3, 3).state_dict()}, ckpt)
    base = ["extract", "--ckpt", ckpt, "--data", "imagefolder", "--data-root", image_tree, "--resize", "36",
            "--crop", "32", "--quiet"]
    single = FeatureCache.open(invoke(runner, featcache, base).output.strip().splitlines()[-1])
    multi = FeatureCache.open(invoke(runner, featcache, [*base, "--views", "2"]).output.strip().splitlines()[-1])
    assert "ColorJitter(0.4,0.4,0.4,0)" in multi.meta["splits"]["train"]["view_transform"]
    stack = multi.split("train", view=None).view_stack()
    np.testing.assert_array_equal(stack[0], single.split("train").features)
    assert (stack[1] != stack[0]).any(axis=1).all()
    again = FeatureCache.open(invoke(runner, featcache, [*base, "--views", "2", "--cache-dir", tmp_path / "other"])
                              .output.strip().splitlines()[-1])
    np.testing.assert_array_equal(again.split("train", view=None).features, multi.split("train", view=None).features)


def test_resume_after_a_kill_is_bit_identical(tiny_ckpt, tmp_path):
    args = [*DIGITS, *VIEWS, "--shard-rows", "100", "--ckpt", str(tiny_ckpt)]

    def run(point, cache):
        env = {**os.environ, "FEATCACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "tests.kill_harness", point, *args], env=env,
                              capture_output=True, text=True, timeout=120)

    reference = run("none", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    expected = FeatureCache.open(reference.stdout.split()[-1]).split("train", view=None)
    killed = run("between-shards", tmp_path / "cache")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    kept = list((tmp_path / "cache").glob("*/train/shard-00000.h5"))
    assert kept and not list((tmp_path / "cache").glob("*/manifest.json"))
    mtime = kept[0].stat().st_mtime_ns
    resumed = run("none", tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr
    entry = FeatureCache.open(resumed.stdout.split()[-1])
    assert kept[0].stat().st_mtime_ns == mtime and entry.verify() == []
    got = entry.split("train", view=None)
    assert len(entry.meta["splits"]["train"]["shards"]) == 12
    for field in ("features", "labels", "indices", "views"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


def downgrade_to_version_1(entry: FeatureCache) -> None:
    """Rewrite an entry as format version 1 wrote it: no `views` datasets, no `views` in the manifest."""
    manifest = json.loads((entry.path / "manifest.json").read_text())
    for split in manifest["splits"].values():
        assert split.pop("views") == 1
        for shard in split["shards"]:
            path = entry.path / shard["file"]
            with h5py.File(path, "a") as handle:
                del handle["views"]
                handle.attrs["format_version"] = 1
            shard.update(sha256=sha256_file(path), size=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns)
    manifest["format_version"] = 1
    (entry.path / "manifest.json").write_text(json.dumps(manifest))


def test_version_1_entries_still_read_and_keep_their_key(tiny_ckpt, cache_dir, runner, entries):
    single = entries[0]
    expected = {s: single.split(s).features.copy() for s in single.splits}
    downgrade_to_version_1(single)
    old = FeatureCache.open(single.path)
    assert old.meta["format_version"] == 1 and old.verify() == []
    for split, features in expected.items():
        assert old.num_views(split) == 1
        np.testing.assert_array_equal(old.split(split).features, features)
        np.testing.assert_array_equal(old.split(split, view=None).views, 0)
    assert extract(runner, tiny_ckpt).path == single.path  # the same key: a hit, nothing rewritten
    assert json.loads((single.path / "manifest.json").read_text())["format_version"] == 1


def test_a_version_1_manifest_with_views_is_refused(entries):
    multi = entries[1]
    manifest = json.loads((multi.path / "manifest.json").read_text())
    manifest["format_version"] = 1
    (multi.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="'views' must be"):
        FeatureCache.open(multi.path)


def test_sweep_on_a_multi_view_entry(entries, runner, tmp_path, monkeypatch):
    single, multi = entries
    records = {}
    for entry in entries:
        out = tmp_path / entry.key
        invoke(runner, lt_cls, ["sweep", "--cache", entry.path, "--methods", "crt,lws,ncm", "--out", out])
        records[entry.key] = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    one, three = records[single.key], records[multi.key]
    assert all(r["status"] == "ok" for r in [*one.values(), *three.values()])
    for field in ("top1", "many", "medium", "few"):
        assert one["ncm"][field] == three["ncm"][field]


def test_crt_draws_every_view(entries, monkeypatch):
    from classifiers import create, training
    multi = entries[1]
    train = multi.split("train", view=None)
    n = train.num_samples
    used = []
    original = training.sgd_train

    def recording(params, grad_fn, epochs, *args, **kwargs):
        used.append(torch.cat(epochs))
        return original(params, grad_fn, epochs, *args, **kwargs)

    monkeypatch.setattr(training, "sgd_train", recording)
    X, y, counts = multi.split("train").features, multi.split("train").labels, multi.class_counts("train")
    plain = create("crt", epochs=2).fit(X, y, class_counts=counts)
    viewed = create("crt", epochs=2).fit(X, y, class_counts=counts, views=train.view_stack())
    assert used[0].max() < n and len(used[1]) == len(used[0]) == 2 * n  # an epoch is still N draws
    views = np.bincount((used[1] // n).numpy(), minlength=3)
    assert (views > 0.25 * len(used[1])).all()
    np.testing.assert_array_equal(used[1] % n, used[0])  # the same samples, then a view each
    np.testing.assert_array_equal(plain.class_draws_, viewed.class_draws_)
    assert not np.array_equal(plain.weight_, viewed.weight_)
    ncm = create("ncm").fit(X, y, class_counts=counts)
    ncm_views = create("ncm").fit(X, y, class_counts=counts, views=train.view_stack())
    np.testing.assert_array_equal(ncm.logits(X), ncm_views.logits(X))


def test_views_of_the_wrong_shape_are_refused(entries):
    from classifiers import create
    from classifiers.base import InvalidInputError
    multi = entries[1]
    X, y = multi.split("train").features, multi.split("train").labels
    with pytest.raises(InvalidInputError, match="views must be K x"):
        create("lws").fit(X, y, classifier=multi.classifier, views=X[None, :-1])


def test_default_sweep_labels_tell_view_counts_apart(entries):
    from classifiers.sweep import default_label
    for entry in entries:
        entry.meta["checkpoint"]["training"] = {"sampler": "instance", "epochs": 12, "seed": 0}
    assert [default_label(e) for e in entries] == ["tinycnn/instance/e12/s0", "tinycnn/instance/e12/s0/K3"]


@pytest.mark.parametrize("k8, word", [(80.0, "help"), (75.2, "make no clear difference"), (70.0, "hurt")])
def test_the_views_study_verdict_is_computed_from_the_numbers(k8, word):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts.views_study import verdict
    records = [{"representation": f"K{k}", "method": "crt", "top1": top1}
               for k, top1 in ((1, 75.0), (1, 75.4), (4, 75.1), (4, 75.3), (8, k8), (8, k8))]
    assert f"**{word}**" in verdict(records, "crt")


def test_views_without_the_training_split_are_refused(tiny_ckpt, cache_dir, runner):
    result = runner.invoke(featcache, [*DIGITS, "--ckpt", str(tiny_ckpt), *VIEWS, "--split", "val"])
    assert result.exit_code == 1 and "applies to the 'train' split" in result.output
