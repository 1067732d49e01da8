"""Foundation: extraction equals a direct torchvision forward, for every checkpoint format."""
import h5py
import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms
from PIL import Image

from cli.featcache_cmd import main as featcache
from featcache import FeatureCache
from featcache.checkpoints import strip_prefixes
from tests.conftest import invoke

RESIZE, CROP = 40, 32


def reference_features(state_dict, root, split):
    """A direct torchvision forward (fc replaced by identity) with the official test transform."""
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(state_dict)
    model.fc = torch.nn.Identity()
    model.eval()
    tf = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    paths = sorted(p for c in sorted((root / split).iterdir()) for p in sorted(c.iterdir()))
    with torch.no_grad():
        return model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).numpy()


@pytest.fixture
def resnet_weights():
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():  # non-trivial BN statistics so that eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def official_format(state_dict):
    feat = {f"module.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
    clf = {f"module.{k}": v for k, v in state_dict.items() if k.startswith("fc.")}
    return {"epoch": 90, "best_acc": 0.5, "state_dict_best": {"feat_model": feat, "classifier": clf}}


@pytest.mark.parametrize("fmt", ["torchvision", "classifier-balancing", "ddp-prefixed"])
def test_extract_equals_torchvision_forward(fmt, resnet_weights, image_tree, cache_dir, runner, tmp_path):
    payload = {"torchvision": resnet_weights, "classifier-balancing": official_format(resnet_weights),
               "ddp-prefixed": {f"module._orig_mod.{k}": v for k, v in resnet_weights.items()}}[fmt]
    ckpt = tmp_path / f"{fmt}.pth"
    torch.save(payload, ckpt)
    result = invoke(runner, featcache, ["extract", "--ckpt", ckpt, "--arch", "resnet18", "--data", "imagefolder",
                                        "--data-root", image_tree, "--resize", RESIZE, "--crop", CROP, "--quiet"])
    entry = FeatureCache.open(result.output.strip().splitlines()[-1])
    assert sorted(entry.splits) == ["test", "train", "val"]
    for split in entry.splits:
        expected = reference_features(resnet_weights, image_tree, split)
        got = entry.split(split).features
        scale = np.abs(expected).max()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * scale
    weight, bias = entry.classifier
    np.testing.assert_array_equal(weight, resnet_weights["fc.weight"].numpy())
    np.testing.assert_array_equal(bias, resnet_weights["fc.bias"].numpy())
    assert entry.split("train").labels.tolist() == [0] * 5 + [1] * 3 + [2]
    assert entry.class_counts("train").tolist() == [5, 3, 1]


def test_second_identical_extract_is_a_hit(tiny_ckpt, cache_dir, runner, monkeypatch):
    args = ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--quiet"]
    first = invoke(runner, featcache, args).output.strip().splitlines()[-1]

    def no_forward(*a, **k):
        raise AssertionError("a cache hit must not run the backbone")
    monkeypatch.setattr("featcache.extract._forward", no_forward)
    second = invoke(runner, featcache, args).output.strip().splitlines()[-1]
    assert first == second
    assert sorted(FeatureCache.open(first).splits) == ["test", "train", "val"]


def test_extract_adds_missing_split_to_existing_entry(tiny_ckpt, cache_dir, runner):
    first = invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split", "val",
                                       "--quiet"]).output.strip().splitlines()[-1]
    assert FeatureCache.open(first).splits == ["val"]
    second = invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split",
                                        "train,test", "--quiet"]).output.strip().splitlines()[-1]
    assert first == second
    assert sorted(FeatureCache.open(first).splits) == ["test", "train", "val"]


def test_key_changes_with_what_changes_features(tiny_ckpt, cache_dir, runner):
    base = ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split", "val", "--quiet"]
    paths = {invoke(runner, featcache, base + extra).output.strip().splitlines()[-1]
             for extra in ([], ["--dtype", "float16"], ["--order-seed", "3", "--class-order", "shuffled"])}
    assert len(paths) == 3


def test_float16_entry_stays_float16(tiny_ckpt, cache_dir, runner):
    out32 = invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split", "val",
                                       "--quiet"]).output.strip().splitlines()[-1]
    out16 = invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--split", "val",
                                       "--dtype", "float16", "--quiet"]).output.strip().splitlines()[-1]
    f32 = FeatureCache.open(out32).split("val").features
    f16 = FeatureCache.open(out16).split("val").features
    assert f16.dtype == np.float16 and f32.dtype == np.float32
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=1e-3, atol=1e-3)


def test_shards_are_plain_hdf5(tiny_ckpt, cache_dir, runner):
    entry = FeatureCache.open(invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt",
                                                         "--shard-rows", "50", "--quiet"]).output.split()[-1])
    for split in entry.splits:
        shards = entry.meta["splits"][split]["shards"]
        parts = []
        for shard in shards:
            with h5py.File(entry.path / shard["file"], "r") as handle:
                assert handle["features"].chunks is not None and handle["features"].fletcher32
                parts.append(handle["features"][...])
                assert handle["labels"].dtype == np.int64 and handle["indices"].dtype == np.int64
        np.testing.assert_array_equal(np.concatenate(parts), entry.split(split).features)
    with h5py.File(entry.path / "classifier.h5", "r") as handle:
        assert handle["weight"].shape == (10, 128)


def test_strip_prefixes():
    assert strip_prefixes({"module._orig_mod.fc.weight": 1, "conv1.weight": 2}) == {"fc.weight": 1, "conv1.weight": 2}


def test_wrong_arch_names_missing_and_unexpected_keys(resnet_weights, image_tree, cache_dir, runner, tmp_path):
    ckpt = tmp_path / "r18.pth"
    torch.save(resnet_weights, ckpt)
    result = runner.invoke(featcache, ["extract", "--ckpt", str(ckpt), "--arch", "resnet50", "--data", "imagefolder",
                                       "--data-root", str(image_tree)])
    assert result.exit_code == 1
    assert "does not fit --arch resnet50" in result.output and "missing keys" in result.output
    assert not any(cache_dir.glob("*/manifest.json"))


def test_a_hit_reads_the_manifest_without_taking_the_lock(tiny_ckpt, cache_dir, runner, monkeypatch):
    args = ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--quiet"]
    first = invoke(runner, featcache, args).output.split()[-1]

    def no_lock(*a, **k):
        raise AssertionError("a complete entry needs no lock")
    monkeypatch.setattr("featcache.store.writer.entry_lock", no_lock)
    assert invoke(runner, featcache, args + ["--split", "train,test"]).output.split()[-1] == first
    with pytest.raises(AssertionError, match="needs no lock"):  # a name to add is a write: it locks
        runner.invoke(featcache, args + ["--name", "digits"], catch_exceptions=False)


def test_a_list_file_with_a_byte_order_mark_reads_as_without(image_tree, tmp_path):
    from featcache.datasets import DataSpec, parse_list_file
    lines = "train/class0/img0.png 0\ntrain/class1/img0.png 1\ntrain/class2/img0.png 2\n"
    (tmp_path / "plain.txt").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.txt").write_text(lines, encoding="utf-8-sig")
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert parse_list_file(tmp_path / "bom.txt") == parse_list_file(tmp_path / "plain.txt")
    assert parse_list_file(tmp_path / "bom.txt")[0] == ("train/class0/img0.png", 0)
    identities = [DataSpec("txt", str(image_tree), {"lists": {"train": str(tmp_path / name)}}).load().split("train").paths
                  for name in ("plain.txt", "bom.txt")]
    assert identities[0] == identities[1]


def test_an_old_format_checkpoint_loads_with_trust(tiny_ckpt, tmp_path, cache_dir, runner):
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(tiny_ckpt, weights_only=True), legacy, _use_new_zipfile_serialization=False,
               pickle_protocol=4)
    args = ["extract", "--data", "digits-lt", "--split", "val", "--quiet"]
    refused = runner.invoke(featcache, args + ["--ckpt", legacy])
    assert refused.exit_code == 1 and "--trust-checkpoint" in refused.output
    loaded = invoke(runner, featcache, args + ["--ckpt", legacy, "--trust-checkpoint"]).output.split()[-1]
    direct = invoke(runner, featcache, args + ["--ckpt", tiny_ckpt]).output.split()[-1]
    np.testing.assert_array_equal(FeatureCache.open(loaded).split("val").features,
                                  FeatureCache.open(direct).split("val").features)
