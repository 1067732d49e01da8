"""Trust in the cache (issue 11, Stage 1): what counts as an entry, content keys for file data,
chunk checksums on every read, float16 range, untrusted files, and clean errors."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cli.featcache_cmd import main as featcache
from featcache.errors import CorruptEntryError, FeatcacheError
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


# -- integrity on every read ---------------------------------------------------------------------


def _fletcher32_reference(data: bytes) -> int:
    """HDF5's H5_checksum_fletcher32, transcribed loop for loop."""
    words, sum1, sum2, i = len(data) // 2, 0, 0, 0
    while words:
        block = min(words, 360)
        words -= block
        for _ in range(block):
            sum1 += (data[i] << 8) | data[i + 1]
            i += 2
            sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[i] << 8
        sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    return sum2 << 16 | sum1


@pytest.mark.parametrize("size", [0, 1, 2, 3, 1023, 2048, 2049, 5001])
def test_fletcher32_matches_hdf5s_definition(size):
    from featcache.store import fletcher32
    rng = np.random.default_rng(size)
    for data in (rng.integers(0, 256, size, dtype=np.uint8).tobytes(), b"\xff" * size, b"\x00" * size):
        assert fletcher32(data) == _fletcher32_reference(data)


def test_fletcher32_matches_the_checksums_hdf5_stores(tmp_path):
    import h5py
    from featcache.store import stored_fletcher_matches as _stored_fletcher_matches
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        handle.create_dataset("a", data=rng.normal(size=(5000, 33)).astype(np.float32), chunks=(700, 33), fletcher32=True)
        handle.create_dataset("b", data=rng.normal(size=(9, 3)).astype(np.float16), chunks=(9, 3), fletcher32=True)
    raw = (tmp_path / "f.h5").read_bytes()
    with h5py.File(tmp_path / "f.h5", "r") as handle:
        for name in ("a", "b"):
            for index in range(handle[name].id.get_num_chunks()):
                info = handle[name].id.get_chunk_info(index)
                chunk = raw[info.byte_offset:info.byte_offset + info.size]
                assert _stored_fletcher_matches(chunk[:-4], chunk[-4:])
                assert not _stored_fletcher_matches(chunk[:10] + bytes([chunk[10] ^ 4]) + chunk[11:-4], chunk[-4:])


def _flip_in_features(shard, byte_in_chunk=100):
    """Flip one bit inside the first features chunk and restore the file's size and mtime."""
    import h5py
    with h5py.File(shard, "r") as handle:
        offset = handle["features"].id.get_chunk_info(0).byte_offset + byte_in_chunk
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x40
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns


def test_flipped_byte_with_size_and_mtime_restored_fails_the_sweep(tiny_ckpt, cache_dir, runner, tmp_path):
    from cli.lt_cls_cmd import main as lt_cls
    path = invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--quiet"]).output.split()[-1]
    shard = cache_dir / os.path.basename(path) / "train" / "shard-00000.h5"
    before = FeatureCache.open(path).split("train").features
    _flip_in_features(shard)
    result = runner.invoke(lt_cls, ["sweep", "--cache", path, "--methods", "ncm", "--out", str(tmp_path / "s"), "--quiet"])
    assert "train/shard-00000.h5" in _one_error_line(result) and "checksum" in result.output
    verify = runner.invoke(featcache, ["verify", path])
    assert verify.exit_code == 1 and "train/shard-00000.h5" in verify.output
    trusted = FeatureCache.open(path, check_chunks=False).split("train").features  # the documented opt-out
    assert (trusted != before).sum() == 1


def test_manifest_rows_beyond_the_shards_fail_verify_and_read(tmp_path, cache_dir, runner):
    path = _import(runner, tmp_path, "rows", rows=6)
    manifest_path = cache_dir / os.path.basename(path) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    split = manifest["splits"]["train"]
    split["rows"] += 4
    split["shards"][0]["rows"] += 4
    split["class_counts"][0] += 4
    manifest_path.write_text(json.dumps(manifest))
    verify = runner.invoke(featcache, ["verify", path])
    assert verify.exit_code == 1 and "has 6 rows, manifest says 10" in verify.output
    with pytest.raises(FeatcacheError, match="has 6 rows, manifest says 10"):
        FeatureCache.open(path).split("train")
    split["shards"][0]["rows"] -= 4
    manifest_path.write_text(json.dumps(manifest))
    assert "damaged: split 'train': its shards hold 6 rows" in invoke(runner, featcache, ["ls"]).output
    split["rows"], split["class_counts"] = 6, [1, 2, 3]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FeatcacheError, match="class_counts of split 'train' do not match"):
        FeatureCache.open(path).split("train")


# -- content addressing of file-based data -------------------------------------------------------


@pytest.fixture
def r18(tmp_path):
    from tests.test_extract import official_format
    import torch
    import torchvision
    torch.manual_seed(1)
    weights = torchvision.models.resnet18(num_classes=3).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(official_format(weights), path)
    return path, weights


def _extract_images(runner, ckpt, root, *extra):
    from tests.test_extract import CROP, RESIZE
    return invoke(runner, featcache, ["extract", "--ckpt", ckpt, "--arch", "resnet18", "--data", "imagefolder",
                                      "--data-root", root, "--resize", RESIZE, "--crop", CROP, "--split", "test",
                                      "--quiet", *extra]).output.split()[-1]


def test_two_folders_with_the_same_names_give_two_entries(r18, image_tree, cache_dir, runner, tmp_path):
    import shutil
    from PIL import Image
    from tests.test_extract import reference_features
    inverted = tmp_path / "inverted"
    shutil.copytree(image_tree, inverted)
    for image in inverted.rglob("*.png"):
        Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    first, second = _extract_images(runner, r18[0], image_tree), _extract_images(runner, r18[0], inverted)
    assert first != second
    for path, root in ((first, image_tree), (second, inverted)):
        expected = reference_features(r18[1], root, "test")
        got = FeatureCache.open(path).split("test").features
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert FeatureCache.open(second).meta["data"]["identity"]["root"] == str(inverted.resolve())


def test_an_image_changed_in_place_is_not_served_from_the_old_entry(r18, image_tree, cache_dir, runner):
    from PIL import Image
    from tests.test_extract import reference_features
    before = _extract_images(runner, r18[0], image_tree)
    image = image_tree / "test" / "class1" / "img0.png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    after = _extract_images(runner, r18[0], image_tree)
    assert after != before
    expected = reference_features(r18[1], image_tree, "test")
    got = FeatureCache.open(after).split("test").features
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_hash_images_sees_an_edit_that_kept_size_and_mtime(r18, image_tree, cache_dir, runner):
    from PIL import Image
    image = image_tree / "test" / "class0" / "raw.bmp"  # uncompressed: an edited pixel keeps the size
    Image.fromarray(np.full((36, 36, 3), 90, np.uint8)).save(image)
    hashed = _extract_images(runner, r18[0], image_tree, "--hash-images")
    assert _extract_images(runner, r18[0], image_tree, "--hash-images") == hashed  # same contents: a hit
    plain = _extract_images(runner, r18[0], image_tree)
    stat, data = image.stat(), bytearray(image.read_bytes())
    data[-20] ^= 0x55  # one pixel byte: same size, other pixels
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _extract_images(runner, r18[0], image_tree) == plain  # size + mtime cannot see it
    assert _extract_images(runner, r18[0], image_tree, "--hash-images") != hashed
    assert "--hash-images applies to" in _one_error_line(
        runner.invoke(featcache, ["extract", "--ckpt", r18[0], "--data", "digits-lt", "--hash-images"]))


# -- float16 storage -----------------------------------------------------------------------------


def test_float16_refuses_values_it_cannot_represent_on_extract(tmp_path, cache_dir, runner):
    import torch
    from featcache.backbones import build_model
    model = build_model("tinycnn", 10, 1)
    last_bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_bn.bias.fill_(1e5)  # finite in float32, Inf in float16
    torch.save({"arch": "tinycnn", "state_dict": model.state_dict()}, tmp_path / "big.pt")
    args = ["extract", "--ckpt", tmp_path / "big.pt", "--data", "digits-lt", "--quiet"]
    line = _one_error_line(runner.invoke(featcache, [str(a) for a in args + ["--dtype", "float16"]]))
    assert "split 'train'" in line and "shard-00000.h5" in line and "cannot be stored as float16" in line
    assert not [p for p in cache_dir.glob("*") if p.name != ".locks"]
    invoke(runner, featcache, args)  # float32 holds them


def test_float16_refuses_values_it_cannot_represent_on_import(tmp_path, cache_dir, runner):
    features = np.ones((4, 3), np.float32)
    features[2, 1] = 70000.0
    np.savez(tmp_path / "big.npz", features=features, labels=np.array([0, 1, 0, 1]))
    line = _one_error_line(runner.invoke(featcache, ["import", "--name", "big", "--dtype", "float16",
                                                     "--split", f"train={tmp_path / 'big.npz'}"]))
    assert "big.npz" in line and "70000 at row 2" in line and "float16" in line
    np.savez(tmp_path / "huge.npz", features=np.full((2, 2), 1e300), labels=np.array([0, 1]))
    assert "cannot be stored as float32" in _one_error_line(
        runner.invoke(featcache, ["import", "--name", "huge", "--split", f"train={tmp_path / 'huge.npz'}"]))
    assert not [p for p in cache_dir.glob("*") if p.name != ".locks"]


# -- untrusted files -----------------------------------------------------------------------------


class _CreatesAFile:
    """Unpickling this calls open(path, 'w'): the file appears only if the payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(tiny_ckpt, tmp_path, cache_dir, runner):
    import torch
    marker = tmp_path / "pwned"
    payload = torch.load(tiny_ckpt, weights_only=True)
    payload["extra"] = _CreatesAFile(marker)
    torch.save(payload, tmp_path / "crafted.pth")
    for args in (["extract", "--ckpt", tmp_path / "crafted.pth", "--data", "digits-lt", "--quiet"],
                 ["import", "--name", "x", "--split", f"train={tmp_path / 'crafted.pth'}"]):
        line = _one_error_line(runner.invoke(featcache, [str(a) for a in args]))
        assert "crafted.pth" in line and "open" in line and ("--trust-checkpoint" in line or "--trust-pickle" in line)
    np.savez(tmp_path / "f.npz", features=np.ones((3, 512), np.float32), labels=np.array([0, 1, 2]))
    line = _one_error_line(runner.invoke(featcache, ["import", "--name", "y", "--split", f"train={tmp_path / 'f.npz'}",
                                                     "--classifier", str(tmp_path / "crafted.pth")]))
    assert "--trust-checkpoint" in line
    assert not marker.exists()


def test_crafted_feature_pickle_is_refused_and_its_payload_never_runs(tmp_path, cache_dir, runner):
    import pickle
    marker = tmp_path / "pwned"
    with open(tmp_path / "feats.pkl", "wb") as handle:
        pickle.dump({"feats": np.ones((2, 2), np.float32), "labels": np.array([0, 1]), "x": _CreatesAFile(marker)}, handle)
    line = _one_error_line(runner.invoke(featcache, ["import", "--name", "p", "--split", f"train={tmp_path / 'feats.pkl'}"]))
    assert "feats.pkl" in line and "--trust-pickle" in line
    assert not marker.exists() and not [p for p in cache_dir.glob("*") if p.name != ".locks"]


def test_crafted_cifar_pickle_is_refused(tmp_path):
    import pickle
    from featcache.datasets import load_cifar10_lt
    marker = tmp_path / "pwned"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _CreatesAFile(marker)}, handle)
    with pytest.raises(FeatcacheError, match="data_batch_1 references io.open"):
        load_cifar10_lt(tmp_path)
    assert not marker.exists()


def test_what_official_files_need_still_loads_without_trust(tmp_path, cache_dir, runner):
    import torch
    import torchvision
    from featcache.checkpoints import load_checkpoint
    from tests.test_extract import official_format
    official = official_format(torchvision.models.resnet18(num_classes=3).state_dict())
    official.update(best_acc=np.float64(0.41), epoch=np.int64(90), dtype=np.dtype("float32"))
    torch.save(official, tmp_path / "official.pth")
    assert load_checkpoint(tmp_path / "official.pth").format == "classifier-balancing"
    torch.save({"features": np.ones((3, 2), np.float32), "labels": torch.tensor([0, 1, 2])}, tmp_path / "np.pt")
    with open(tmp_path / "py2.pkl", "wb") as handle:  # protocol 2, as Python 2-era tools wrote
        pickle_payload = {"feats": np.arange(8, dtype=np.float32).reshape(4, 2), "labels": np.array([0, 1, 1, 0]),
                          "meta": {"acc": np.float32(0.5), "names": ("a", "b"), "seen": {1, 2}}}
        import pickle
        pickle.dump(pickle_payload, handle, protocol=2)
    path = invoke(runner, featcache, ["import", "--name", "ok", "--split", f"train={tmp_path / 'np.pt'}",
                                      "--split", f"val={tmp_path / 'py2.pkl'}"]).output.split()[-1]
    np.testing.assert_array_equal(FeatureCache.open(path).split("val").features, pickle_payload["feats"])


# -- errors --------------------------------------------------------------------------------------


def _limit_file_size():
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_write_failure_during_import_is_one_clean_line(tmp_path):
    import subprocess
    import sys
    np.savez(tmp_path / "big.npz", features=np.random.default_rng(0).random((20000, 16), np.float32),
             labels=np.arange(20000) % 5)
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "cli.featcache_cmd", "import", "--name", "big", "--split",
                             f"train={tmp_path / 'big.npz'}", "--cache-dir", str(cache)],
                            capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("Error: cannot write")
    assert "shard-00000.h5" in result.stderr
    assert [p.name for p in cache.iterdir()] == [".locks"]


def test_huge_labels_are_a_clear_error(tmp_path, cache_dir, runner):
    np.savez(tmp_path / "f.npz", features=np.ones((2, 2), np.float32), labels=np.array([0, 10**9]))
    line = _one_error_line(runner.invoke(featcache, ["import", "--name", "h", "--split", f"train={tmp_path / 'f.npz'}"]))
    assert "f.npz" in line and "1000000000" in line


def test_out_of_memory_message_names_only_options_the_command_has(tmp_path, runner, monkeypatch):
    from featcache import importer, store

    def oom(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(importer, "import_features", oom)
    line = _one_error_line(runner.invoke(featcache, ["import", "--name", "m", "--split", "train=x.npz"]))
    assert line.startswith("Error: out of memory") and "--batch-size" not in line and "--dtype float16" in line
    monkeypatch.setattr(store, "scan_entries", oom)
    assert _one_error_line(runner.invoke(featcache, ["ls", "--cache-dir", str(tmp_path)])) == "Error: out of memory"


# -- HDF5 metadata and the manifest's dtype, checked on every read -------------------------------


def _small_entry(root, dtype="float32", classifier=True):
    from featcache.store import writing
    rng = np.random.default_rng(3)
    features, labels = rng.normal(size=(12, 3)).astype(np.float32), np.arange(12) % 3
    with writing(root, "k", {"kind": "test", "feature_dim": 3, "dtype": dtype, "num_classes": 3}) as entry:
        if classifier:
            entry.write_classifier(rng.normal(size=(3, 3)), rng.normal(size=3))
        entry.write_split("train", features, labels)
    return root / "k"


def _chunk_bytes(path):
    """Byte offsets of every chunk's data (fletcher32 covers them) in the HDF5 file at ``path``."""
    import h5py
    covered = set()
    with h5py.File(path, "r") as handle:
        for name in handle:
            dataset = handle[name]
            for index in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(index)
                covered.update(range(info.byte_offset, info.byte_offset + info.size))
    return covered


@pytest.mark.parametrize("file, stride", [("train/shard-00000.h5", 2), ("classifier.h5", 3)])
def test_every_metadata_byte_flip_reads_the_original_or_is_refused(tmp_path, file, stride):
    """A single-byte flip anywhere outside the chunks' data, mtime restored (so the SHA-256 is
    skipped): every read returns the original values or one CorruptEntryError, never a traceback
    or other values. (Every ``stride``-th byte here; all 15,464 of the shard's were run for
    docs/reliability.md.)"""
    entry = _small_entry(tmp_path)
    path = entry / file
    original, stat = path.read_bytes(), path.stat()
    reference = FeatureCache.open(entry)
    expected = [reference.split("train").features, reference.split("train").labels,
                reference.split("train").indices, *reference.classifier]
    outcomes = {"same": 0, "refused": 0}
    covered = _chunk_bytes(path)
    for offset in [i for i in range(len(original)) if i not in covered][::stride]:
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        path.write_bytes(bytes(damaged))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        try:
            cache = FeatureCache.open(entry)
            split = cache.split("train")
            got = [split.features, split.labels, split.indices, *cache.classifier]
        except CorruptEntryError:
            outcomes["refused"] += 1
            continue
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), f"byte {offset}: other values read"
        outcomes["same"] += 1
    path.write_bytes(original)
    assert outcomes["refused"] > 10 and outcomes["same"] > 10, outcomes


def _rewrite_dataset(path, name, values, **kwargs):
    """Replace dataset ``name`` of an HDF5 file in place, keeping the file's size and mtime checks
    honest afterwards is the caller's business (the manifest is updated by _rehash)."""
    import h5py
    with h5py.File(path, "r+") as handle:
        del handle[name]
        handle.create_dataset(name, data=values, **kwargs)


def _rehash(entry):
    """Record the shards' current hashes, sizes and mtimes in the manifest (so only the layout
    checks can notice the change)."""
    from featcache.store import sha256_file
    manifest_path = entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["splits"]["train"]["shards"] + [manifest["classifier"]]:
        stat = (entry / info["file"]).stat()
        info.update(sha256=sha256_file(entry / info["file"]), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, values, kwargs, message", [
    ("indices", np.arange(12, dtype=">i8"), {"chunks": (12,), "fletcher32": True}, "stored as >i8"),
    ("labels", (np.arange(12) % 3).astype("<i4"), {"chunks": (12,), "fletcher32": True}, "stored as int32"),
    ("features", np.zeros((12, 3), ">f4"), {"chunks": (12, 3), "fletcher32": True}, "stored as >f4"),
    ("features", np.zeros((12, 3), "<f8"), {"chunks": (12, 3), "fletcher32": True}, "stored as float64"),
    ("features", np.zeros((12, 3), "<f4"), {"chunks": (12, 3)}, "no fletcher32"),
    ("features", np.zeros((12, 3), "<f4"), {"chunks": (12, 3), "fletcher32": True, "shuffle": True},
     "unknown filter pipeline"),
    ("features", np.zeros((12, 3), "<f4"), {}, "not stored in chunks"),
])
def test_a_dataset_of_another_type_or_layout_is_refused_not_converted(tmp_path, runner, name, values, kwargs,
                                                                      message):
    entry = _small_entry(tmp_path / "cache")
    _rewrite_dataset(entry / "train" / "shard-00000.h5", name, values, **kwargs)
    _rehash(entry)
    with pytest.raises(CorruptEntryError, match=message):
        FeatureCache.open(entry).split("train")
    verify = runner.invoke(featcache, ["verify", str(entry)])
    assert verify.exit_code == 1 and message in verify.output


def test_a_manifest_dtype_that_contradicts_its_shards_fails_verify_every_read_and_the_sweep(tmp_path, runner):
    from cli.lt_cls_cmd import main as lt_cls
    entry = _small_entry(tmp_path / "cache")
    manifest_path = entry / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "dtype": "float16"}))
    with pytest.raises(CorruptEntryError, match="stored as float32, not the float16"):
        FeatureCache.open(entry).split("train")
    verify = runner.invoke(featcache, ["verify", str(entry)])
    assert verify.exit_code == 1 and "not the float16" in verify.output
    result = runner.invoke(lt_cls, ["sweep", "--cache", str(entry), "--methods", "ncm", "--eval-split", "train",
                                    "--out", str(tmp_path / "sweep"), "--quiet"])
    assert "not the float16" in _one_error_line(result)


def test_a_classifier_of_another_shape_or_type_is_refused(tmp_path):
    entry = _small_entry(tmp_path / "cache")
    _rewrite_dataset(entry / "classifier.h5", "bias", np.zeros(4, "<f4"), chunks=True, fletcher32=True)
    _rehash(entry)
    with pytest.raises(CorruptEntryError, match="bias has 4 rows, manifest says 3"):
        FeatureCache.open(entry).classifier
    _rewrite_dataset(entry / "classifier.h5", "bias", np.zeros(3, "<f8"), chunks=True, fletcher32=True)
    _rehash(entry)
    with pytest.raises(CorruptEntryError, match="stored as float64"):
        FeatureCache.open(entry).classifier


# -- issue 26: finding every entry, names, sizes, leftovers, read-only roots, full disks ---------


def test_a_key_prefix_finds_damaged_and_incomplete_entries(tmp_path, cache_dir, runner):
    damaged = _import(runner, tmp_path, "damaged")
    (cache_dir / os.path.basename(damaged) / "manifest.json").write_text("{truncated")
    incomplete = cache_dir / ("e" * 24)
    (incomplete / "train").mkdir(parents=True)
    (incomplete / ENTRY_MARKER).write_text("{}")
    key = os.path.basename(damaged)
    assert "not valid JSON" in _one_error_line(runner.invoke(featcache, ["info", key[:6]]))
    assert "not valid JSON" in _one_error_line(runner.invoke(featcache, ["verify", key[:6]]))
    assert "not a complete cache entry" in _one_error_line(runner.invoke(featcache, ["info", "eeeeee"]))
    assert invoke(runner, featcache, ["rm", key[:6]]).output.strip() == f"removed {damaged}"
    assert invoke(runner, featcache, ["rm", "eeee"]).output.strip() == f"removed {incomplete}"
    assert not os.path.exists(damaged) and not incomplete.exists()


def test_a_symlinked_entry_is_listed_once_and_its_name_stays_unique(tmp_path, cache_dir, runner):
    path = _import(runner, tmp_path, "real")
    key = os.path.basename(path)
    os.symlink(key, cache_dir / "alias")  # a link to an entry under the root: the entry is listed, not the link
    outside = _import(runner, tmp_path, "outside")
    moved = tmp_path / "elsewhere"
    os.rename(outside, moved)
    os.symlink(moved, cache_dir / "shared")  # a link to an entry outside the root: listed once, by the link
    os.symlink(moved, cache_dir / "shared-again")
    listed = [line.split()[0] for line in invoke(runner, featcache, ["ls"]).output.splitlines()[2:]]
    assert sorted(listed) == sorted([key, "shared"])
    verified = invoke(runner, featcache, ["verify", "--all"]).output.splitlines()
    assert sorted(verified) == sorted([f"OK {path}", f"OK {cache_dir / 'shared'}"])
    assert invoke(runner, featcache, ["info", "real"]).output.splitlines()[0].split()[-1] == path
    assert invoke(runner, featcache, ["info", key[:6]]).output.splitlines()[0].split()[-1] == path
    shown = str(cache_dir / "shared")
    assert invoke(runner, featcache, ["info", "outside"]).output.splitlines()[0].split()[-1] == shown
    outside_key = os.path.basename(outside)
    assert invoke(runner, featcache, ["info", outside_key[:6]]).output.splitlines()[0].split()[-1] == shown


def test_import_refuses_a_name_that_would_be_ambiguous(tmp_path, cache_dir, runner):
    first = _import(runner, tmp_path, "first")
    key = os.path.basename(first)
    np.savez(tmp_path / "other.npz", features=np.ones((3, 4), np.float32), labels=np.array([0, 1, 2]))
    for name, message in [("first", "already names entry"), (key, "reads as a cache key"),
                          (key[:8], "the key of entry"), ("", "non-empty"), (".", "'.'"), ("..", "'..'"),
                          ("x/y", "without '/'"), (" pad", "leading or trailing"), ("~home", "'~'")]:
        result = runner.invoke(featcache, ["import", "--name", name, "--split", f"train={tmp_path / 'other.npz'}"])
        assert message in _one_error_line(result), (name, result.output)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([".locks", key])
    assert _import(runner, tmp_path, "first") == first  # the same import again is a hit, not a clash


def test_a_manifest_claiming_1e15_rows_is_named_not_allocated(tmp_path, runner):
    entry = _small_entry(tmp_path / "cache")
    manifest_path = entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    split = manifest["splits"]["train"]
    split["rows"] = 10**15
    split["class_counts"][0] += 10**15 - 12
    split["shards"][0]["rows"] = 10**15
    manifest_path.write_text(json.dumps(manifest))
    verify = runner.invoke(featcache, ["verify", str(entry)])
    assert verify.exit_code == 1 and "Traceback" not in verify.output and "out of memory" not in verify.output
    assert "shard-00000.h5: /features has 12 rows, manifest says 1000000000000000" in verify.output, verify.output
    with pytest.raises(FeatcacheError, match=r"split 'train' of entry .*1,000,000,000,000,000 rows of 3 float32 "
                                             r"features, which need 32.0 PiB of memory"):
        FeatureCache.open(entry).split("train")


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns if p.is_file() else 0) for p in root.rglob("*"))


@pytest.fixture
def read_only(tmp_path):
    """``read_only(path)``: ``path`` made read-only for the rest of the test: a read-only bind mount of
    it over itself where mounting is allowed; else (as root, where chmod blocks nothing) every way
    featcache creates, opens for writing, renames or removes a file under it raises EROFS."""
    import builtins
    import errno
    import io
    import shutil
    import subprocess
    mounted, patches = [], []

    def make(path):
        path = str(path)
        if shutil.which("mount") and subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0:
            mounted.append(path)
            if subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True).returncode == 0:
                return "mount"
        if os.geteuid() != 0:
            for p in [path, *(str(q) for q in __import__("pathlib").Path(path).rglob("*"))]:
                os.chmod(p, 0o555 if os.path.isdir(p) else 0o444)
            patches.append(("chmod", path))
            return "chmod"
        return _simulate(path)

    def _simulate(path):
        def inside(target):
            try:
                return os.path.abspath(os.fspath(target)).startswith(path)
            except TypeError:
                return False

        def refuse(target):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(target))

        def guard(original, writes=lambda *a, **k: True, at=0):
            def wrapper(*args, **kwargs):
                if len(args) > at and inside(args[at]) and writes(*args, **kwargs):
                    refuse(args[at])
                return original(*args, **kwargs)
            return wrapper

        def opens_for_writing(file, mode="r", *args, **kwargs):
            return any(c in mode for c in "wax+")

        def os_open_writes(file, flags, *args, **kwargs):
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        originals = {(builtins, "open"): guard(builtins.open, opens_for_writing),
                     (io, "open"): guard(io.open, opens_for_writing),
                     (os, "open"): guard(os.open, os_open_writes),
                     (os, "mkdir"): guard(os.mkdir), (os, "replace"): guard(os.replace),
                     (os, "rename"): guard(os.rename), (os, "unlink"): guard(os.unlink),
                     (os, "remove"): guard(os.remove), (os, "rmdir"): guard(os.rmdir)}
        for (module, name), wrapper in originals.items():
            patches.append((module, name, getattr(module, name)))
            setattr(module, name, wrapper)
        return "simulated"

    yield make
    for item in reversed(patches):
        if item[0] == "chmod":
            for p in [item[1], *(str(q) for q in __import__("pathlib").Path(item[1]).rglob("*"))]:
                os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
        else:
            setattr(*item)
    for path in reversed(mounted):
        subprocess.run(["umount", path], check=False)


def test_a_hit_on_a_complete_entry_under_a_read_only_root(tiny_ckpt, tmp_path, cache_dir, runner, read_only):
    from cli.lt_cls_cmd import main as lt_cls
    args = ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--quiet"]
    path = invoke(runner, featcache, args).output.split()[-1]
    imported = _import(runner, tmp_path, "features")
    reference = FeatureCache.open(path).split("train").features.copy()
    before = _tree(cache_dir)
    how = read_only(cache_dir)
    assert invoke(runner, featcache, args).output.split()[-1] == path
    assert invoke(runner, featcache, args + ["--split", "val"]).output.split()[-1] == path
    assert _import(runner, tmp_path, "features") == imported
    np.testing.assert_array_equal(FeatureCache.open(path).split("train").features, reference)
    invoke(runner, featcache, ["verify", path])
    invoke(runner, featcache, ["ls"])
    invoke(runner, lt_cls, ["sweep", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--methods", "ncm",
                            "--out", tmp_path / "sweep", "--quiet"])
    assert (tmp_path / "sweep").is_dir()
    line = _one_error_line(runner.invoke(featcache, args + ["--dtype", "float16"]))  # a miss needs the lock
    assert ".locks" in line and ("Read-only" in line or "Permission" in line), (how, line)
    assert _tree(cache_dir) == before, how


def test_resuming_with_other_shard_rows_removes_the_old_plans_shards(tiny_ckpt, cache_dir, runner, monkeypatch):
    from featcache.store import SplitWriter
    original = SplitWriter.finish

    def killed(self, *args, **kwargs):  # like a SIGKILL before the commit: nothing is cleaned up
        raise KeyboardInterrupt
    monkeypatch.setattr(SplitWriter, "finish", killed)
    args = ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split", "train", "--quiet"]
    assert runner.invoke(featcache, args + ["--shard-rows", "50"]).exit_code != 0
    entry = next(cache_dir.glob("*/train")).parent
    assert len(list((entry / "train").glob("shard-*.h5"))) == 8  # 369 rows in shards of 50
    assert "INCOMPLETE" in runner.invoke(featcache, ["verify", "--all"]).output  # no manifest yet
    monkeypatch.setattr(SplitWriter, "finish", original)
    path = invoke(runner, featcache, args + ["--shard-rows", "200"]).output.split()[-1]
    assert sorted(p.name for p in (entry / "train").iterdir()) == ["shard-00000.h5", "shard-00001.h5"]
    result = invoke(runner, featcache, ["verify", path])
    assert result.output.strip() == f"OK {path}"
    (entry / "train" / "shard-00007.h5").write_bytes(b"left over")  # say, by an older featcache
    (entry / "notes.txt").write_text("mine")
    result = runner.invoke(featcache, ["verify", path])
    assert result.exit_code == 0 and f"OK {path}" in result.output
    assert f"UNLISTED {entry / 'train' / 'shard-00007.h5'}: not a shard of split 'train'" in result.output
    assert f"UNLISTED {entry / 'notes.txt'}: not written by featcache" in result.output


def _fail_writes_of(monkeypatch, name):
    """Every open-for-write of a file whose name holds ``name`` fails as on a full disk."""
    import builtins
    import errno
    from featcache.store import durable
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if name in os.path.basename(os.fspath(file)) and any(c in mode for c in "wa+"):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(durable, "open", full_open, raising=False)


@pytest.mark.parametrize("name, message", [("manifest.json", "/manifest.json"), ("shard-00000.json", "/shard-00000.json")])
def test_disk_full_while_writing_the_manifest_or_a_sidecar_names_it(tmp_path, cache_dir, runner, monkeypatch, name,
                                                                    message):
    np.savez(tmp_path / "f.npz", features=np.ones((6, 4), np.float32), labels=np.arange(6) % 3)
    _fail_writes_of(monkeypatch, name)
    line = _one_error_line(runner.invoke(featcache, ["import", "--name", "n", "--split", f"train={tmp_path / 'f.npz'}"]))
    assert line.startswith("Error: disk full while writing ") and line.split()[5].endswith(message + ";"), line
    assert [p.name for p in cache_dir.iterdir()] == [".locks"]


def test_after_a_failed_train_shard_no_later_split_is_committed(tiny_ckpt, cache_dir, runner, monkeypatch):
    """Small splits are written and committed in the background behind the next split's forward pass:
    the train shard's failure must stop the val split's commit that is queued behind it."""
    import errno
    from featcache.store import SplitWriter
    original = SplitWriter._write_h5

    def full(self, path, *args):
        if self.name == "train":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path, *args)
    monkeypatch.setattr(SplitWriter, "_write_h5", full)
    result = runner.invoke(featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split", "train,val",
                                       "--quiet"])
    assert "disk full while writing" in _one_error_line(result) and "train/shard-00000.h5" in result.output
    assert not list(cache_dir.glob("*/manifest.json")) and not list(cache_dir.glob("*/val"))
