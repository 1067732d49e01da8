"""What featcache says and shows: hits, resumes and damage; foreign heads and random init; ls / info;
--help; the Python entry points featcache.extract_features / featcache.train_backbone."""
import re

import numpy as np
import pytest
import torch

import featcache
from cli.featcache_cmd import main as featcache_cli
from featcache import FeatureCache
from featcache.datasets import DATASET_OPTIONS
from tests.conftest import invoke

DIGITS = ["extract", "--data", "digits-lt", "--split", "val", "--quiet"]


def entry_of(result):
    return result.output.strip().splitlines()[-1]


def test_a_hit_says_so_and_builds_no_model(tiny_ckpt, cache_dir, runner, monkeypatch):
    first = runner.invoke(featcache_cli, DIGITS + ["--ckpt", str(tiny_ckpt)], catch_exceptions=False)
    assert "cache hit" not in first.stderr

    def no_model(*a, **k):
        raise AssertionError("a cache hit must not build the model")
    monkeypatch.setattr("featcache.extract.load_backbone", no_model)
    second = runner.invoke(featcache_cli, DIGITS + ["--ckpt", str(tiny_ckpt)], catch_exceptions=False)
    path = entry_of(first)
    assert second.exit_code == 0 and entry_of(second) == path
    key = path.rsplit("/", 1)[-1]
    assert f"cache hit: {key} ({path})" in second.stderr


def test_a_hit_without_the_request_index_still_hits_and_keys_follow_every_input(tiny_ckpt, cache_dir, runner,
                                                                                 tmp_path):
    path = entry_of(invoke(runner, featcache_cli, DIGITS + ["--ckpt", tiny_ckpt]))
    for index in (cache_dir / ".requests").iterdir():  # an entry written before the index existed
        index.unlink()
    again = runner.invoke(featcache_cli, DIGITS + ["--ckpt", str(tiny_ckpt)], catch_exceptions=False)
    assert entry_of(again) == path and "cache hit" in again.stderr
    state = torch.load(tiny_ckpt, weights_only=True)
    state["state_dict"]["fc.bias"] += 1  # other checkpoint bytes, same file name
    torch.save(state, tiny_ckpt)
    others = {entry_of(invoke(runner, featcache_cli, DIGITS + ["--ckpt", tiny_ckpt] + extra))
              for extra in ([], ["--dtype", "float16"], ["--imbalance", "10"], ["--arch", "tinycnn"])}
    assert path not in others and len(others) == 3  # --arch tinycnn is what the checkpoint records


def test_resuming_an_interrupted_entry_says_how_far_it_got(tiny_ckpt, cache_dir, runner, monkeypatch):
    import featcache.extract as extract_module
    real, calls = extract_module._forward_rows, []

    def dies_on_third_shard(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(extract_module, "_forward_rows", dies_on_third_shard)
    args = DIGITS + ["--ckpt", str(tiny_ckpt), "--shard-rows", "30"]  # val: 100 rows, 4 shards
    assert runner.invoke(featcache_cli, args).exit_code == 1  # click's Abort for Ctrl-C: the shards stay
    monkeypatch.setattr(extract_module, "_forward_rows", real)
    resumed = runner.invoke(featcache_cli, args, catch_exceptions=False)
    assert resumed.exit_code == 0 and "resuming 2/4 shards of split 'val'" in resumed.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "classifier"])
def test_a_damaged_entry_is_refused_not_a_hit(damage, tiny_ckpt, cache_dir, runner):
    path = entry_of(invoke(runner, featcache_cli, DIGITS + ["--ckpt", tiny_ckpt]))
    key = path.rsplit("/", 1)[-1]
    target = (FeatureCache.open(path).path / ("classifier.h5" if damage == "classifier" else "val/shard-00000.h5"))
    data = bytearray(target.read_bytes())
    if damage in ("flip", "classifier"):
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    else:
        target.unlink()
    for _ in range(2):  # the request index and the slow path both refuse
        refused = runner.invoke(featcache_cli, DIGITS + ["--ckpt", str(tiny_ckpt)])
        lines = refused.output.strip().splitlines()
        assert refused.exit_code == 1 and len(lines) == 1, refused.output
        assert lines[0].startswith(f"Error: cache entry {key} is damaged") and f"featcache rm {key}" in lines[0]
        assert "cache hit" not in refused.output
        for index in (cache_dir / ".requests").iterdir():
            index.unlink()
    invoke(runner, featcache_cli, ["rm", key])
    assert entry_of(invoke(runner, featcache_cli, DIGITS + ["--ckpt", tiny_ckpt])) == path


def test_a_foreign_head_is_not_stored(cache_dir, runner, tmp_path):
    from featcache.backbones import build_model
    ckpt = tmp_path / "twelve.pt"
    torch.save({"arch": "tinycnn", "state_dict": build_model("tinycnn", 12, 1).state_dict()}, ckpt)
    result = runner.invoke(featcache_cli, DIGITS + ["--ckpt", str(ckpt)], catch_exceptions=False)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(ckpt) in warnings[0] and "tinycnn" in warnings[0]
    assert "12-class head" in warnings[0] and "10 classes" in warnings[0]
    entry = FeatureCache.open(entry_of(result))
    assert entry.classifier is None and entry.num_classes == 10
    assert "classifier   none: the checkpoint's head has 12 classes, the data set 10" in \
        invoke(runner, featcache_cli, ["info", entry.path]).output


def test_random_init_needs_no_weights_file_and_is_reproducible(cache_dir, runner):
    args = DIGITS + ["--ckpt", "random", "--arch", "tinycnn"]
    first = FeatureCache.open(entry_of(invoke(runner, featcache_cli, args)))
    assert first.classifier is None and first.meta["checkpoint"]["format"] == "random-init"
    rng = torch.get_rng_state()
    import shutil
    shutil.rmtree(first.path)
    again = FeatureCache.open(entry_of(invoke(runner, featcache_cli, args)))
    assert torch.equal(rng, torch.get_rng_state())  # the seed draws the weights, the caller's state is kept
    assert again.path == first.path
    np.testing.assert_array_equal(again.split("val").features, first.split("val").features)
    seeded = entry_of(invoke(runner, featcache_cli, DIGITS + ["--ckpt", "random:1", "--arch", "tinycnn"]))
    assert seeded != str(first.path)
    missing = runner.invoke(featcache_cli, DIGITS + ["--ckpt", "random"])
    assert missing.exit_code == 1 and "--ckpt random needs --arch" in missing.output


def test_random_init_timm(image_tree, cache_dir, runner):
    pytest.importorskip("timm")
    result = invoke(runner, featcache_cli, ["extract", "--ckpt", "random", "--arch", "timm/test_resnet", "--data",
                                            "imagefolder", "--data-root", image_tree, "--split", "test", "--quiet"])
    entry = FeatureCache.open(entry_of(result))
    assert entry.classifier is None and entry.num_classes == 3
    assert entry.meta["backbone"]["head"] == "none: random-init weights (--ckpt random)"


def test_ls_shows_run_views_and_size_and_info_the_checkpoint_and_counts(tmp_path, cache_dir, runner):
    last = invoke(runner, featcache_cli, ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "1",
                                          "--epoch-draws", "64", "--out", tmp_path / "run", "--quiet"]).output.split()[-1]
    base = ["extract", "--ckpt", last, "--split", "train", "--quiet"]
    one = entry_of(invoke(runner, featcache_cli, base))
    four = entry_of(invoke(runner, featcache_cli, base + ["--views", "4", "--train-transform", "flip"]))
    lines = invoke(runner, featcache_cli, ["ls"]).output.splitlines()
    header = lines[0].split()
    assert header == ["key", "name", "arch", "data", "run", "splits", "views", "dim", "dtype", "size", "created",
                      "status"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    for path, views, run in ((one, "1", "tinycnn/instance/e1/s0"), (four, "4", "tinycnn/instance/e1/s0/K4")):
        row = rows[path.rsplit("/", 1)[-1]]
        assert row[header.index("run") - 1] == run  # the name column is empty
        assert row[header.index("views") - 1] == views
        assert re.fullmatch(r"[0-9.]+", row[header.index("size") - 1]) and row[header.index("size")] == "KiB"
    info = invoke(runner, featcache_cli, ["info", one]).output
    assert f"checkpoint   {last}  (featcache)" in info and "run          tinycnn/instance/e1/s0" in info
    assert "max 120, median 22, min 4" in info and "per class" not in info
    full = invoke(runner, featcache_cli, ["info", one, "--counts"]).output
    counts = FeatureCache.open(one).class_counts("train").tolist()
    assert f"  per class  {','.join(map(str, counts))}" in full


COMMANDS = ["train", "extract", "import", "ls", "info", "verify", "rm", "archs", "datasets"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example(command, runner):
    text = invoke(runner, featcache_cli, [command, "--help"]).output
    example = text.split("Example:")[1].split("Options:")[0]
    assert f"featcache {command}" in example


def test_help_marks_data_required_and_shows_the_data_sets_defaults(runner):
    train = invoke(runner, featcache_cli, ["train", "--help"]).output
    assert re.search(r"--data TEXT .*?\[required\]", train, re.S).group(0).count("--") == 1
    missing = runner.invoke(featcache_cli, ["train", "--arch", "tinycnn", "--out", "x"])
    assert missing.exit_code == 2 and "Missing option '--data'" in missing.output
    extract = " ".join(invoke(runner, featcache_cli, ["extract", "--help"]).output.split())
    assert "the one a `featcache train` checkpoint records" in extract
    for name, option, shown in (("digits-lt", "imbalance", "digits-lt 30"), ("cifar10-lt", "imbalance", "others 100"),
                                ("digits-lt", "max_per_class", "digits-lt 120"),
                                ("cifar100-lt", "max_per_class", "cifar100-lt 500"),
                                ("cifar10-lt", "max_per_class", "others 5000"),
                                ("digits-lt", "val_per_class", "digits-lt 10"),
                                ("cifar100-lt", "val_per_class", "cifar100-lt 0"),
                                ("cifar10-lt", "val_per_class", "others 20"),
                                ("imagefolder", "resize", "default 256"), ("imagefolder", "crop", "default 224")):
        assert shown.split()[-1] == f"{getattr(DATASET_OPTIONS[name](), option):g}"
        assert shown in extract


def test_python_entry_points_take_keywords(tmp_path, cache_dir):
    import subprocess
    import sys
    light = subprocess.run([sys.executable, "-c", "import featcache, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"
    last = featcache.train_backbone(data="digits-lt", arch="tinycnn", epochs=1, epoch_draws=64, out=tmp_path / "run",
                           progress=False, data_options={"imbalance": 10})
    assert last == tmp_path / "run" / "last.pt"
    entry = featcache.extract_features(ckpt=last, splits="train,val", progress=False)
    assert isinstance(entry, FeatureCache) and sorted(entry.splits) == ["train", "val"]
    assert entry.meta["data"]["spec"]["options"]["imbalance"] == 10
    assert featcache.extract_features(last, "digits-lt", data_options={"imbalance": 10}, splits=["val"],
                             progress=False).path == entry.path
    from featcache.extract import ExtractRequest, extract_features
    assert featcache.extract_features is extract_features and ExtractRequest
    with pytest.raises(featcache.errors.FeatcacheError, match="not_an_option"):
        featcache.extract_features(ckpt=last, data="digits-lt", data_options={"not_an_option": 1}, progress=False)
    with pytest.raises(TypeError, match="batchsize"):
        featcache.extract_features(ckpt=last, batchsize=3)


def test_a_foreign_timm_head_is_not_stored(image_tree, cache_dir, runner, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=5).state_dict(), tmp_path / "m.safetensors")
    result = runner.invoke(featcache_cli, ["extract", "--ckpt", str(tmp_path / "m.safetensors"), "--arch",
                                           "timm/test_resnet", "--data", "imagefolder", "--data-root", str(image_tree),
                                           "--split", "test", "--quiet"], catch_exceptions=False)
    assert "timm/test_resnet) has a 5-class head but data set 'imagefolder' has 3 classes" in result.stderr
    entry = FeatureCache.open(entry_of(result))
    assert entry.classifier is None and entry.num_classes == 3
