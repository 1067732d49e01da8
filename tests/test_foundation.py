"""timm / open_clip backbones: extraction equals the library's own forward over its own transform.

Models are tiny (timm's ``test_*`` configs, a 2-layer open_clip config) with random weights; nothing
is downloaded."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli.featcache_cmd import main as featcache
from featcache import FeatureCache
from tests.conftest import invoke

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

FAMILIES = ["test_resnet", "test_vit", "test_convnext"]  # a CNN (BatchNorm), a ViT, a ConvNeXt


def images(root, split):
    return sorted(p for c in sorted((root / split).iterdir()) for p in sorted(c.iterdir()))


def random_timm(name, num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BN statistics, so that eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@torch.no_grad()
def timm_reference(model, paths):
    """What a timm user computes: timm's eval transform, then the head's pre-logits."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def assert_close(got, expected):
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def extract(runner, ckpt, arch, root, *extra):
    result = invoke(runner, featcache, ["extract", "--ckpt", ckpt, "--arch", arch, "--data", "imagefolder",
                                        "--data-root", root, "--split", "test", "--quiet", *extra])
    return FeatureCache.open(result.output.strip().splitlines()[-1])


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_safetensors_equals_timm_forward(name, image_tree, cache_dir, runner, tmp_path, monkeypatch):
    model = random_timm(name)
    ckpt = tmp_path / "m.safetensors"
    save_file(model.state_dict(), ckpt)
    entry = extract(runner, ckpt, f"timm/{name}", image_tree)
    assert_close(entry.split("test").features, timm_reference(model, images(image_tree, "test")))
    weight, bias = entry.classifier
    np.testing.assert_array_equal(weight, model.get_classifier().weight.detach().numpy())
    np.testing.assert_array_equal(bias, model.get_classifier().bias.detach().numpy())
    assert entry.meta["backbone"]["library"] == "timm"
    assert "interpolation=" in entry.meta["transform"]

    def no_forward(*a, **k):
        raise AssertionError("a cache hit must not run the backbone")
    monkeypatch.setattr("featcache.extract._forward", no_forward)
    assert extract(runner, ckpt, f"timm/{name}", image_tree).path == entry.path


@pytest.mark.parametrize("wrap", ["module-prefix", "model-prefix", "model-wrapped", "state_dict-wrapped"])
def test_timm_pth_state_dicts_give_the_same_features(wrap, image_tree, cache_dir, runner, tmp_path):
    model = random_timm("test_convnext")
    state = model.state_dict()
    payload = {"module-prefix": {f"module.{k}": v for k, v in state.items()},
               "model-prefix": {f"model.{k}": v for k, v in state.items()},
               "model-wrapped": {"model": state, "epoch": 3},
               "state_dict-wrapped": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    save_file(state, tmp_path / "m.safetensors")
    torch.save(payload, tmp_path / "m.pth")
    reference = extract(runner, tmp_path / "m.safetensors", "timm/test_convnext", image_tree)
    entry = extract(runner, tmp_path / "m.pth", "timm/test_convnext", image_tree)
    assert entry.path != reference.path  # another checkpoint file, another entry
    np.testing.assert_array_equal(entry.split("test").features, reference.split("test").features)
    np.testing.assert_array_equal(entry.classifier[0], reference.classifier[0])


def test_headless_checkpoint_gives_features_and_no_classifier(image_tree, cache_dir, runner, tmp_path):
    model = random_timm("test_vit")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    torch.save(state, tmp_path / "headless.bin")
    entry = extract(runner, tmp_path / "headless.bin", "timm/test_vit", image_tree)
    assert entry.classifier is None
    assert_close(entry.split("test").features, timm_reference(model, images(image_tree, "test")))
    info = invoke(runner, featcache, ["info", entry.path]).output
    assert "classifier   none: the checkpoint has no head" in info


def test_resize_crop_override_is_another_entry(image_tree, cache_dir, runner, tmp_path):
    model = random_timm("test_resnet")
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    default = extract(runner, tmp_path / "m.safetensors", "timm/test_resnet", image_tree)
    small = extract(runner, tmp_path / "m.safetensors", "timm/test_resnet", image_tree, "--resize", 40, "--crop", 32)
    assert small.path != default.path
    assert "Resize(size=40, interpolation=bilinear" in small.meta["transform"]
    config = timm.data.resolve_model_data_config(model)
    from torchvision import transforms
    transform = transforms.Compose([transforms.Resize(40, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize(config["mean"], config["std"])])
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images(image_tree, "test")])
        expected = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert_close(small.split("test").features, expected)


def test_hf_hub_reads_the_local_cache_only(image_tree, cache_dir, runner, tmp_path, monkeypatch):
    import huggingface_hub.constants
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    result = runner.invoke(featcache, ["extract", "--ckpt", "hf-hub:someone/tiny-vit", "--arch", "timm/test_vit",
                                       "--data", "imagefolder", "--data-root", str(image_tree), "--quiet"])
    assert result.exit_code == 1
    assert "not in the local Hugging Face cache" in result.output and str(hub) in result.output
    model = random_timm("test_vit")
    snapshot = hub / "models--someone--tiny-vit" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (hub / "models--someone--tiny-vit" / "refs").mkdir()
    (hub / "models--someone--tiny-vit" / "refs" / "main").write_text("abc123")
    save_file(model.state_dict(), snapshot / "model.safetensors")
    entry = extract(runner, "hf-hub:someone/tiny-vit", "timm/test_vit", image_tree)
    assert_close(entry.split("test").features, timm_reference(model, images(image_tree, "test")))


def test_hf_hub_revision_and_broken_links(cache_dir, tmp_path, monkeypatch):
    """``hf-hub:ORG/NAME@REV`` reads that revision (a ref or a commit); a weights file whose blob is
    gone is named as a broken link, not reported as missing from the cache."""
    import huggingface_hub.constants
    from featcache.checkpoints import resolve_hf_hub
    from featcache.errors import FeatcacheError
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--net"
    for commit in ("aaa111", "bbb222"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model.safetensors").write_bytes(commit.encode())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa111")
    (repo / "refs" / "v2").write_text("bbb222")
    assert resolve_hf_hub("hf-hub:org/net").read_bytes() == b"aaa111"
    assert resolve_hf_hub("hf-hub:org/net@v2").read_bytes() == b"bbb222"
    assert resolve_hf_hub("hf-hub:org/net@bbb222").read_bytes() == b"bbb222"
    with pytest.raises(FeatcacheError, match="at revision 'v3'"):
        resolve_hf_hub("hf-hub:org/net@v3")
    (repo / "snapshots" / "bbb222" / "model.safetensors").unlink()
    os.symlink("../../blobs/gone", repo / "snapshots" / "bbb222" / "model.safetensors")
    with pytest.raises(FeatcacheError, match="bbb222/model.safetensors is a broken link"):
        resolve_hf_hub("hf-hub:org/net@v2")
    for bad in ("hf-hub:org/net@", "hf-hub:org/net@../x", "hf-hub:org", "hf-hub:o/n/x", "hf-hub:org/n et"):
        with pytest.raises(FeatcacheError, match=r"--ckpt hf-hub:"):
            resolve_hf_hub(bad)


def test_duplicate_class_names_are_refused(tmp_path):
    from featcache.errors import FeatcacheError
    from featcache.foundation import zeroshot_inputs
    with pytest.raises(FeatcacheError, match="the data set's class names: class 2 and class 0 are both named 'a'"):
        zeroshot_inputs(["a", "b", "a"], 3, None, None)
    (tmp_path / "names.txt").write_bytes("\ufeffred fox\ncat\nred fox\n".encode())  # a BOM is not part of a name
    with pytest.raises(FeatcacheError, match="names.txt: class 2 and class 0 are both named 'red fox'"):
        zeroshot_inputs([], 3, str(tmp_path / "names.txt"), None)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(FeatcacheError, match="latin1.txt cannot be read: not UTF-8 text"):
        zeroshot_inputs([], 1, str(tmp_path / "latin1.txt"), None)
    assert zeroshot_inputs(["a", "b"], 2, None, None).class_names == ["a", "b"]


def test_wrong_checkpoint_for_the_arch_is_one_line(image_tree, cache_dir, runner, tmp_path):
    save_file(random_timm("test_vit").state_dict(), tmp_path / "vit.safetensors")
    result = runner.invoke(featcache, ["extract", "--ckpt", str(tmp_path / "vit.safetensors"), "--arch",
                                       "timm/test_convnext", "--data", "imagefolder", "--data-root", str(image_tree)])
    assert result.exit_code == 1 and "does not fit --arch timm/test_convnext" in result.output
    (tmp_path / "bad.safetensors").write_bytes(b"not tensors at all")
    result = runner.invoke(featcache, ["extract", "--ckpt", str(tmp_path / "bad.safetensors"), "--arch",
                                       "timm/test_vit", "--data", "imagefolder", "--data-root", str(image_tree)])
    assert result.exit_code == 1 and "is not a safetensors file" in result.output
    result = runner.invoke(featcache, ["extract", "--ckpt", str(tmp_path / "vit.safetensors"), "--arch",
                                       "timm/no_such_model", "--data", "imagefolder", "--data-root", str(image_tree)])
    assert result.exit_code == 1 and "timm has no model 'no_such_model'" in result.output


def test_archs_lists_timm_models(runner):
    output = invoke(runner, featcache, ["archs", "--timm", "test_conv*"]).output.split()
    assert "timm/test_convnext" in output and "timm/test_vit" not in output


def test_train_timm_from_init_reinitialises_the_head(image_tree, tmp_path, cache_dir, runner):
    init = random_timm("test_vit", num_classes=5, seed=3)
    torch.save({"model": init.state_dict()}, tmp_path / "init.pth")
    out = tmp_path / "run"
    invoke(runner, featcache, ["train", "--data", "imagefolder", "--data-root", image_tree, "--arch", "timm/test_vit",
                               "--init", tmp_path / "init.pth", "--epochs", 1, "--batch-size", 4, "--lr", 0,
                               "--wd", 0, "--momentum", 0, "--out", out, "--quiet", "--device", "cpu"])
    state = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    assert state["head.weight"].shape == (3, 64)  # the data set's 3 classes, not the init's 5
    for key, value in init.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(state[key], value)  # lr 0: the init's weights, untouched
    entry = FeatureCache.open(invoke(runner, featcache, ["extract", "--ckpt", out / "last.pt", "--split", "test",
                                                         "--quiet"]).output.strip().splitlines()[-1])
    assert entry.meta["arch"] == "timm/test_vit"
    np.testing.assert_array_equal(entry.classifier[0], state["head.weight"].numpy())


# ---------------------------------------------------------------------------------------------
# open_clip

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture
def tiny_clip(tmp_path_factory):
    """A 2-layer open_clip config registered as featcache-tiny-clip, random weights as safetensors."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clip-config")
    (folder / "featcache-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("featcache-tiny-clip", pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    path = folder / "clip.safetensors"
    save_file(model.state_dict(), path)
    return model.eval(), preprocess, path


@torch.no_grad()
def test_open_clip_zeroshot_head_equals_open_clip_logits(tiny_clip, image_tree, cache_dir, runner, tmp_path):
    import open_clip
    model, preprocess, ckpt = tiny_clip
    names = ["red fox", "tabby cat", "golden retriever"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of the {}.\n")
    entry = extract(runner, ckpt, "open_clip/featcache-tiny-clip", image_tree, "--zeroshot-head",
                    "--class-names", tmp_path / "names.txt", "--templates", tmp_path / "templates.txt")
    x = torch.stack([preprocess(Image.open(p)) for p in images(image_tree, "test")])
    image = model.encode_image(x)
    image = image / image.norm(dim=-1, keepdim=True)
    features = entry.split("test").features
    assert_close(features, image.numpy())
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    tokenizer = open_clip.get_tokenizer("featcache-tiny-clip")
    classes = []
    for name in names:
        text = model.encode_text(tokenizer([f"a photo of a {name}.", f"a drawing of the {name}."]))
        mean = (text / text.norm(dim=-1, keepdim=True)).mean(0)
        classes.append(mean / mean.norm())
    expected = (model.logit_scale.exp() * image @ torch.stack(classes).T).numpy()
    weight, bias = entry.classifier
    assert_close(features @ weight.T + bias, expected)
    np.testing.assert_array_equal(bias, 0)
    backbone = entry.meta["backbone"]
    assert backbone["model"] == "featcache-tiny-clip" and backbone["pretrained_tag"] is None
    assert backbone["templates"] == ["a photo of a {}.", "a drawing of the {}."]
    assert backbone["class_names"] == names
    assert entry.meta["transform"] == " ".join(repr(preprocess).split())


def test_open_clip_defaults_and_key(tiny_clip, image_tree, cache_dir, runner):
    from featcache.foundation import DEFAULT_TEMPLATES
    model, preprocess, ckpt = tiny_clip
    plain = extract(runner, ckpt, "open_clip/featcache-tiny-clip", image_tree)
    assert plain.classifier is None
    head = extract(runner, ckpt, "open_clip/featcache-tiny-clip", image_tree, "--zeroshot-head")
    assert head.path != plain.path  # the head is part of the entry, so of its key
    assert head.meta["backbone"]["templates"] == list(DEFAULT_TEMPLATES)
    assert "a photo of a {}." in DEFAULT_TEMPLATES
    assert head.classifier[0].shape == (3, 32)  # ImageFolder's class names: class0..class2
    np.testing.assert_array_equal(head.split("test").features, plain.split("test").features)


def test_zeroshot_options_are_checked(tiny_clip, image_tree, cache_dir, runner, tmp_path):
    _, _, ckpt = tiny_clip
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    base = ["extract", "--ckpt", str(ckpt), "--data", "imagefolder", "--data-root", str(image_tree), "--quiet"]
    cases = [(["--arch", "open_clip/featcache-tiny-clip", "--zeroshot-head", "--class-names", str(tmp_path / "two.txt")],
              "2 class names in"),
             (["--arch", "timm/test_vit", "--zeroshot-head"], "need an open_clip/ arch"),
             (["--arch", "open_clip/featcache-tiny-clip", "--templates", str(tmp_path / "two.txt")],
              "add --zeroshot-head"),
             (["--arch", "open_clip/featcache-tiny-clip", "--zeroshot-head", "--templates", str(tmp_path / "two.txt")],
              "must hold the class name"),
             (["--arch", "open_clip/featcache-tiny-clip.nope"], "no pretrained tag 'nope'"),
             (["--arch", "open_clip/featcache-tiny-clip", "--zeroshot-head", "--class-names", str(tmp_path / "dup.txt")],
              "class 2 and class 0 are both named 'cat'")]
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    for extra, message in cases:
        result = runner.invoke(featcache, base + extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)


def test_open_clip_hf_hub_prefers_open_clip_weights(tiny_clip, image_tree, cache_dir, runner, tmp_path, monkeypatch):
    """timm's hub repositories of CLIP models hold timm weights and open_clip weights side by side."""
    import huggingface_hub.constants
    _, _, ckpt = tiny_clip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--timm--tiny-clip"
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    save_file(random_timm("test_vit").state_dict(), repo / "snapshots" / "c0ffee" / "model.safetensors")
    (repo / "snapshots" / "c0ffee" / "open_clip_model.safetensors").write_bytes(ckpt.read_bytes())
    direct = extract(runner, ckpt, "open_clip/featcache-tiny-clip", image_tree)
    hub = extract(runner, "hf-hub:timm/tiny-clip", "open_clip/featcache-tiny-clip", image_tree)
    assert hub.path == direct.path  # the same bytes: the same entry


def test_timm_on_in_memory_gray_images(cache_dir, runner, tmp_path):
    """Array data sets (digits) go through timm's transform too, as RGB PIL images."""
    from featcache.datasets import load_digits_lt
    model = random_timm("test_resnet", num_classes=10)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    result = invoke(runner, featcache, ["extract", "--ckpt", tmp_path / "m.safetensors", "--arch", "timm/test_resnet",
                                        "--data", "digits-lt", "--max-per-class", 5,
                                        "--split", "val", "--quiet"])
    entry = FeatureCache.open(result.output.strip().splitlines()[-1])
    samples = load_digits_lt(max_per_class=5).split("val")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    with torch.no_grad():
        x = torch.stack([transform(Image.fromarray(image).convert("RGB")) for image in samples.images])
        expected = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert_close(entry.split("val").features, expected)
