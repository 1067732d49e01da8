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
