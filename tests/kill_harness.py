"""Run `featcache` and SIGKILL itself at a chosen point of the write path (used by
tests/test_reliability.py). Usage: python -m tests.kill_harness POINT featcache-args...

Points: first-shard (before any shard is written), mid-shard (HDF5 file half written),
between-shards (after shard 0 is committed), before-rename (hashed, sidecar written, not yet
renamed), before-manifest, manifest-replace (manifest temp file written, not yet renamed),
second-split (after the first split's manifest commit). 'none' runs normally and prints
WORKED when this process did the extraction itself."""
import os
import signal
import sys

import h5py

from featcache import extract as extract_module
from featcache import store


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    calls = {"write_shard": 0, "commit": 0}
    original_write_shard = store.SplitWriter.write_shard
    original_create = h5py.Group.create_dataset
    original_replace = os.replace
    original_commit = store.EntryWriter.commit_split
    original_extract = extract_module._extract_splits

    def write_shard(self, index, *args):
        calls["write_shard"] += 1
        if point == "first-shard" or (point == "between-shards" and calls["write_shard"] == 2):
            die()
        return original_write_shard(self, index, *args)

    def create_dataset(self, name, *args, **kwargs):
        dataset = original_create(self, name, *args, **kwargs)
        if point == "mid-shard" and name == "features" and calls["write_shard"] == 2:
            self.file.flush()
            die()
        return dataset

    def replace(src, dst, *args, **kwargs):
        dst_name = os.fspath(dst)
        if point == "before-rename" and dst_name.endswith("shard-00001.h5"):
            die()
        if point == "manifest-replace" and dst_name.endswith("manifest.json"):
            die()
        return original_replace(src, dst, *args, **kwargs)

    def commit_split(self, *args, **kwargs):
        calls["commit"] += 1
        if point == "before-manifest" or (point == "second-split" and calls["commit"] == 2):
            die()
        return original_commit(self, *args, **kwargs)

    def extract_splits(*args, **kwargs):
        print("WORKED", file=sys.stderr, flush=True)
        return original_extract(*args, **kwargs)

    store.SplitWriter.write_shard = write_shard
    h5py.Group.create_dataset = create_dataset
    os.replace = replace
    store.EntryWriter.commit_split = commit_split
    extract_module._extract_splits = extract_splits


if __name__ == "__main__":
    install(sys.argv[1])
    from cli.featcache_cmd import main
    sys.argv = ["featcache"] + sys.argv[2:]
    main()
