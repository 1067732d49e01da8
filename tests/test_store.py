"""The cache format: manifest-last commits, checksums, version refusal, plain-HDF5 readability."""
import json
import pickle

import numpy as np
import pytest
import torch

from cli.featcache_cmd import main as featcache
from featcache import FeatureCache
from featcache.errors import CorruptEntryError, FeatcacheError, UnknownFormatError
from featcache.store import writing
from tests.conftest import invoke


def make_entry(root, rows=300, dim=16, shard_rows=100, key="k"):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(rows, dim)).astype(np.float32)
    labels = rng.integers(0, 5, size=rows)
    with writing(root, key, {"kind": "test", "feature_dim": dim, "dtype": "float32", "num_classes": 5}) as entry:
        entry.write_split("train", features, labels, shard_rows=shard_rows)
    return entry.path, features, labels


def test_round_trip(tmp_path):
    path, features, labels = make_entry(tmp_path)
    entry = FeatureCache.open(path)
    split = entry.split("train")
    np.testing.assert_array_equal(split.features, features)
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.indices, np.arange(300))
    assert entry.class_counts("train").tolist() == np.bincount(labels, minlength=5).tolist()
    assert entry.classifier is None and entry.verify() == []


def test_unknown_format_version_is_refused(tmp_path):
    path, _, _ = make_entry(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnknownFormatError, match="format_version 99"):
        FeatureCache.open(path)


def test_entry_without_manifest_is_not_an_entry(tmp_path):
    path, _, _ = make_entry(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(FeatcacheError, match="not a complete cache entry"):
        FeatureCache.open(path)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_fails_verify_and_read(tmp_path, runner):
    path, _, _ = make_entry(tmp_path)
    assert invoke(runner, featcache, ["verify", path]).exit_code == 0
    shard = path / "train" / "shard-00001.h5"
    flip_byte(shard, shard.stat().st_size // 2)
    result = runner.invoke(featcache, ["verify", str(path)])
    assert result.exit_code == 1 and "shard-00001.h5" in result.output
    with pytest.raises(CorruptEntryError, match="shard-00001.h5"):
        FeatureCache.open(path).split("train")


def test_import_official_pickle_round_trips(tmp_path, cache_dir, runner):
    rng = np.random.default_rng(0)
    files, data = {}, {}
    for split, rows in (("train", 50), ("val", 20)):
        data[split] = (rng.normal(size=(rows, 8)).astype(np.float32), rng.integers(0, 4, size=rows))
        files[split] = tmp_path / f"{split}.pkl"
        with open(files[split], "wb") as handle:
            pickle.dump({"feats": data[split][0], "labels": data[split][1], "logits": None}, handle)
    clf = tmp_path / "clf.pth"
    torch.save({"state_dict_best": {"feat_model": {}, "classifier": {"module.fc.weight": torch.ones(4, 8),
                                                                      "module.fc.bias": torch.zeros(4)}}}, clf)
    args = ["import", "--name", "mine", "--classifier", clf] + sum((["--split", f"{s}={f}"] for s, f in files.items()), [])
    path = invoke(runner, featcache, args).output.strip().splitlines()[-1]
    entry = FeatureCache.open(path)
    for split, (features, labels) in data.items():
        np.testing.assert_array_equal(entry.split(split).features, features)
        np.testing.assert_array_equal(entry.split(split).labels, labels)
    np.testing.assert_array_equal(entry.classifier[0], np.ones((4, 8)))
    assert invoke(runner, featcache, ["info", "mine"]).output.count("rows") == 2


def test_import_npz_and_pt(tmp_path, cache_dir, runner):
    features, labels = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 1, 2])
    np.savez(tmp_path / "a.npz", features=features, labels=labels)
    torch.save({"features": torch.from_numpy(features), "labels": torch.from_numpy(labels)}, tmp_path / "b.pt")
    path = invoke(runner, featcache, ["import", "--name", "x", "--split", f"train={tmp_path / 'a.npz'}",
                                      "--split", f"test={tmp_path / 'b.pt'}"]).output.split()[-1]
    entry = FeatureCache.open(path)
    np.testing.assert_array_equal(entry.split("test").features, features)
    np.testing.assert_array_equal(entry.split("train").labels, labels)


def test_ls_and_rm(tmp_path, cache_dir, runner):
    np.savez(tmp_path / "a.npz", features=np.ones((3, 2), np.float32), labels=np.array([0, 1, 0]))
    path = invoke(runner, featcache, ["import", "--name", "gone", "--split", f"train={tmp_path / 'a.npz'}"]).output.split()[-1]
    assert "gone" in invoke(runner, featcache, ["ls"]).output
    invoke(runner, featcache, ["rm", "gone"])
    assert not (cache_dir / path.split("/")[-1]).exists()


def test_commit_records_each_shards_file_hash_once_and_rehashes_a_changed_one(tmp_path, monkeypatch):
    """finish() takes the SHA-256 write_shard took (no second hash), unless the shard's size no
    longer matches its sidecar; either way the manifest holds the hash of the file on disk."""
    from featcache import store
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(200, 8)).astype(np.float32), rng.integers(0, 5, size=200)
    hashed = []
    original = store.sha256_file
    monkeypatch.setattr(store.writer, "sha256_file", lambda path, **kw: hashed.append(path) or original(path, **kw))
    with writing(tmp_path, "k", {"kind": "test", "feature_dim": 8, "dtype": "float32", "num_classes": 5}) as writer:
        split = writer.split_writer("train", rows=200, dim=8, dtype="float32", shard_rows=100)
        for i in split.pending_shards():
            a, b = split.shard_range(i)
            split.write_shard(i, features[a:b], labels[a:b], np.arange(a, b))
        sidecar = tmp_path / "k" / "train" / "shard-00001.json"
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "size": 1}))  # no longer matches
        hashed.clear()
        split.finish(np.bincount(labels, minlength=5))
    assert [p.name for p in hashed] == ["shard-00001.h5"]
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        assert shard["sha256"] == original(tmp_path / "k" / shard["file"])
    assert FeatureCache.open(tmp_path / "k").verify() == []


def test_writing_answers_a_complete_request_without_the_lock(tmp_path, monkeypatch):
    path, features, labels = make_entry(tmp_path)
    meta = {"kind": "test", "feature_dim": 16, "dtype": "float32", "num_classes": 5}

    def no_lock(*args, **kwargs):
        raise AssertionError("locked")
    monkeypatch.setattr("featcache.store.writer.entry_lock", no_lock)
    with writing(tmp_path, "k", meta, needs=["train"]) as entry:
        assert entry.read_only and entry.complete_splits() == ["train"]
        with pytest.raises(RuntimeError, match="complete hit"):  # a hit writes nothing, by construction
            entry.write_split("val", features, labels)
    for needs, name in ((["train", "val"], None), (["train"], "named")):  # a missing split or a new name: lock
        with pytest.raises(AssertionError, match="locked"):
            with writing(tmp_path, "k", meta, needs=needs, name=name):
                pass
    assert not (path / "val").exists()


def test_a_new_plan_removes_the_old_plans_extra_shards_of_an_uncommitted_split(tmp_path):
    meta = {"kind": "test", "feature_dim": 4, "dtype": "float32", "num_classes": 2}
    features, labels = np.ones((10, 4), np.float32), np.arange(10) % 2
    with writing(tmp_path, "k", meta) as entry:
        old = entry.split_writer("train", rows=10, dim=4, dtype="float32", shard_rows=2)
        for index in old.pending_shards():
            start, stop = old.shard_range(index)
            old.write_shard(index, features[start:stop], labels[start:stop], np.arange(start, stop))
    assert len(list((tmp_path / "k" / "train").glob("shard-*.h5"))) == 5  # never committed (as if killed)
    (tmp_path / "k" / "train" / "mine.txt").write_text("not a shard")
    with writing(tmp_path, "k", meta) as entry:
        entry.write_split("train", features, labels, shard_rows=4)
    names = sorted(p.name for p in (tmp_path / "k" / "train").iterdir())
    assert names == ["mine.txt", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    cache = FeatureCache.open(tmp_path / "k")
    np.testing.assert_array_equal(cache.split("train").features, features)
    assert [(p.name, why.split(" (")[0]) for p, why in cache.unlisted_files()] == [
        ("mine.txt", "not a shard of split 'train'")]


def test_unlisted_files_name_an_uncommitted_split_once(tmp_path):
    path, features, labels = make_entry(tmp_path, rows=300, shard_rows=100)
    meta = {"kind": "test", "feature_dim": 16, "dtype": "float32", "num_classes": 5}
    with writing(tmp_path, "k", meta) as entry:  # two shards of a val split, never committed
        split = entry.split_writer("val", rows=300, dim=16, dtype="float32", shard_rows=100)
        for index in (0, 1):
            start, stop = split.shard_range(index)
            split.write_shard(index, features[start:stop], labels[start:stop], np.arange(start, stop))
    (path / ".manifest.json.tmp-1").write_text("{")
    unlisted = FeatureCache.open(path).unlisted_files()
    assert [(p.name, why.split(" (")[0]) for p, why in unlisted] == [
        (".manifest.json.tmp-1", "a temporary file left by a killed writer"),
        ("val", "4 file(s) of split 'val', which is not committed")]


def test_feature_cache_opens_an_entry_by_name_key_or_prefix_as_the_cli_does(tmp_path, monkeypatch):
    from featcache.store import writing
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    with writing(root, "0123456789abcdef01234567", {"kind": "test", "feature_dim": 4, "dtype": "float32",
                                                   "num_classes": 3}, name="digits-ib") as entry:
        entry.write_split("train", rng.normal(size=(9, 4)).astype(np.float32), np.arange(9) % 3)
    for ref in ("digits-ib", "0123456789abcdef01234567", "0123"):
        assert FeatureCache.open(ref, cache_dir=root).path == entry.path
    monkeypatch.setenv("FEATCACHE_DIR", str(root))
    assert FeatureCache.open("digits-ib").key == "0123456789abcdef01234567"
    with pytest.raises(FeatcacheError, match="no cache entry 'nothing'"):
        FeatureCache.open("nothing")
