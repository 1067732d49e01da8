"""Trust in the cache (issue 11, Stage 1): what counts as an entry, content keys for file data,
chunk checksums on every read, float16 range, untrusted files, and clean errors."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cli.featcache_cmd import main as featcache
from featcache.errors import FeatcacheError
from featcache.store import ENTRY_MARKER, FeatureCache, resolve_entry
from tests.conftest import invoke


def _import(runner, tmp_path, name, rows=6, split="train"):
    rng = np.random.default_rng(len(name))
    file = tmp_path / f"{name}.npz"
    np.savez(file, features=rng.normal(size=(rows, 4)).astype(np.float32), labels=np.arange(rows) % 3)
    return invoke(runner, featcache, ["import", "--name", name, "--split", f"{split}={file}"]).output.split()[-1]


def _one_error_line(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- entries and removal -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["", ".", "folder", "{tmp}/folder", "{tmp}/folder/", "{cache}/folder", "{cache}"])
def test_rm_refuses_what_is_not_an_entry_and_leaves_it(target, tmp_path, cache_dir, runner, monkeypatch):
    _import(runner, tmp_path, "kept")
    for parent in (tmp_path, cache_dir):
        (parent / "folder").mkdir(exist_ok=True)
        (parent / "folder" / "precious.txt").write_text("mine")
        (parent / "folder" / "manifest.json").write_text('{"not": "ours"}')
    (tmp_path / "loose.txt").write_text("also mine")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(featcache, ["rm", target.format(tmp=tmp_path, cache=cache_dir)])
    _one_error_line(result)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_name_shadowed_by_a_directory_in_cwd_resolves_to_the_entry(tmp_path, cache_dir, runner, monkeypatch):
    path = _import(runner, tmp_path, "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert invoke(runner, featcache, ["info", "data"]).output.splitlines()[0].split()[-1] == path
    assert invoke(runner, featcache, ["rm", "data"]).output.strip() == f"removed {path}"
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine" and not os.path.exists(path)


def test_rm_by_key_prefix_and_path(tmp_path, cache_dir, runner):
    first, second = _import(runner, tmp_path, "one"), _import(runner, tmp_path, "two")
    key = os.path.basename(first)
    invoke(runner, featcache, ["rm", key[:6]])
    invoke(runner, featcache, ["rm", second])
    assert not os.path.exists(first) and not os.path.exists(second)
    _one_error_line(runner.invoke(featcache, ["rm", key[:2]]))  # too short to be a key prefix


def test_rm_refuses_a_symlinked_entry_without_following_it(tmp_path, cache_dir, runner):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = _import(runner, tmp_path, "real")
    target = elsewhere / os.path.basename(path)
    os.rename(path, target)
    os.symlink(target, path)
    assert "symbolic link" in _one_error_line(runner.invoke(featcache, ["rm", "real"]))
    assert (target / "manifest.json").is_file()


def test_entries_are_marked_and_resolution_refuses_non_entries(tmp_path, cache_dir, runner):
    path = _import(runner, tmp_path, "marked")
    assert json.loads((cache_dir / os.path.basename(path) / ENTRY_MARKER).read_text())["key"] == os.path.basename(path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FeatcacheError, match="is not a cache entry"):
        resolve_entry(str(tmp_path / "plain"), cache_dir)


def test_cache_dir_that_is_a_file(tmp_path, runner):
    (tmp_path / "file").write_text("x")
    for args in (["ls"], ["verify", "--all"], ["rm", "x"], ["info", "x"]):
        assert "is not a directory" in _one_error_line(runner.invoke(featcache, args + ["--cache-dir", str(tmp_path / "file")]))
    assert (tmp_path / "file").read_text() == "x"


def test_ls_shows_every_entry_with_its_status(tmp_path, cache_dir, runner):
    good, damaged, gone = (_import(runner, tmp_path, n) for n in ("good", "damaged", "gone"))
    (cache_dir / os.path.basename(damaged) / "manifest.json").write_text("{truncated")
    gone_shard = next((cache_dir / os.path.basename(gone)).glob("train/*.h5"))
    gone_shard.unlink()
    incomplete = cache_dir / ("f" * 24)
    incomplete.mkdir()
    (incomplete / ENTRY_MARKER).write_text("{}")
    (cache_dir / "not-an-entry").mkdir()
    lines = {line.split()[0]: line for line in invoke(runner, featcache, ["ls"]).output.splitlines()[2:]}
    assert set(lines) == {os.path.basename(p) for p in (good, damaged, gone)} | {"f" * 24}
    assert lines[os.path.basename(good)].endswith(" ok")
    assert "damaged: manifest.json is not valid JSON" in lines[os.path.basename(damaged)]
    assert "damaged: train/shard-00000.h5 is missing" in lines[os.path.basename(gone)]
    assert lines["f" * 24].endswith(" incomplete")
    result = runner.invoke(featcache, ["verify", "--all"])
    assert result.exit_code == 1
    assert f"OK {good}" in result.output and "INCOMPLETE" in result.output
    assert f"BAD {damaged}" in result.output and "shard-00000.h5: missing" in result.output
    invoke(runner, featcache, ["rm", os.path.basename(damaged)])  # a damaged entry can still be removed
    assert not os.path.exists(damaged)
