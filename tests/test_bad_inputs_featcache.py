"""Every featcache error path: exit != 0, exactly one `Error:` line naming the culprit, no traceback,
and nothing left in the cache. Includes the cases docs/reliability.md lists."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from cli.featcache_cmd import main as featcache


class _CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def world(tmp_path, image_tree, tiny_ckpt, cache_dir, runner, monkeypatch):
    """Small bad files of every kind, plus two entries (one with an unknown format, one damaged)."""
    from featcache.backbones import build_model
    from torchvision.models import resnet18
    t = tmp_path
    (t / "not-a-ckpt.pt").write_text("hello")
    (t / "a-directory.pt").mkdir()
    (t / "list.txt").write_text("train/class0/img0.png 0\nthis line is broken\n")
    (t / "labels.txt").write_text("train/class0/img0.png 0\ntrain/class1/img0.png 7\n")
    (t / "empty.txt").write_text("")
    (t / "broken" / "train" / "c0").mkdir(parents=True)
    (t / "broken" / "train" / "c0" / "bad.png").write_bytes(b"not an image")
    model = build_model("tinycnn", 10, 1)
    with torch.no_grad():
        model.features[0].weight.fill_(float("nan"))
    torch.save({"arch": "tinycnn", "state_dict": model.state_dict()}, t / "nan.pt")
    model = build_model("tinycnn", 10, 1)
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1].bias.fill_(1e5)
    torch.save({"arch": "tinycnn", "state_dict": model.state_dict()}, t / "big.pt")
    torch.save(resnet18(num_classes=3).state_dict(), t / "r18-3.pt")
    crafted = torch.load(tiny_ckpt, weights_only=True)
    crafted["x"] = _CreatesAFile(t / "pwned")
    torch.save(crafted, t / "crafted.pth")
    torch.save(crafted, t / "legacy.pth", _use_new_zipfile_serialization=False)  # pre-1.6 format
    torch.save(torch.load(tiny_ckpt, weights_only=True), t / "legacy-p4.pth", _use_new_zipfile_serialization=False,
               pickle_protocol=4)  # plain weights, but the weights-only loader cannot read a protocol-4 legacy file
    (t / "latin1.txt").write_bytes("train/class0/img0.png 0\ntrain/caf\u00e9.png 1\n".encode("latin-1"))
    (t / "arabic-digit.txt").write_text("train/class0/img0.png 0\ntrain/class1/img0.png \u0663\n", encoding="utf-8")
    (t / "superscript.txt").write_text("train/class0/img0.png \u00b2\n", encoding="utf-8")
    import huggingface_hub.constants
    hub = t / "hub" / "models--org--weights"
    (hub / "snapshots" / "abc123").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    os.symlink("../../blobs/5eed", hub / "snapshots" / "abc123" / "model.safetensors")  # its blob is gone
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(t / "hub"))
    (t / "run").mkdir()
    torch.save(crafted, t / "run" / "last.pt")
    torch.save({"features": torch.ones(2, 2), "labels": torch.tensor([0, 1]), "x": _CreatesAFile(t / "pwned")},
               t / "crafted-feats.pt")
    with open(t / "crafted.pkl", "wb") as handle:
        pickle.dump({"feats": np.ones((2, 2)), "labels": np.array([0, 1]), "x": _CreatesAFile(t / "pwned")}, handle)
    np.savez(t / "d4.npz", features=np.ones((3, 4), np.float32), labels=np.array([0, 1, 2]))
    np.savez(t / "d5.npz", features=np.ones((3, 5), np.float32), labels=np.array([0, 1, 2]))
    np.savez(t / "nan.npz", features=np.full((2, 2), np.nan, np.float32), labels=np.array([0, 1]))
    np.savez(t / "huge-label.npz", features=np.ones((2, 2), np.float32), labels=np.array([0, 10**9]))
    np.savez(t / "negative.npz", features=np.ones((2, 2), np.float32), labels=np.array([0, -3]))
    np.savez(t / "f16.npz", features=np.full((2, 2), 1e6, np.float32), labels=np.array([0, 1]))
    (t / "feats.csv").write_text("1,2\n")
    (t / "file-not-dir").write_text("x")
    (t / "plain-dir").mkdir()
    (t / "plain-dir" / "keep.txt").write_text("mine")
    entries = {}
    for name in ("future", "damaged", "linked"):
        out = runner.invoke(featcache, ["import", "--name", name, "--split", f"train={t / 'd4.npz'}"])
        entries[name] = out.output.split()[-1]
    manifest = os.path.join(entries["future"], "manifest.json")
    meta = json.load(open(manifest))
    meta["format_version"] = 99
    json.dump(meta, open(manifest, "w"))
    open(os.path.join(entries["damaged"], "manifest.json"), "w").write("{")
    os.rename(entries["linked"], t / "moved")
    os.symlink(t / "moved", entries["linked"])
    before = sorted(p.name for p in cache_dir.iterdir())
    key = os.path.basename(entries["damaged"])
    return {"t": t, "ckpt": tiny_ckpt, "images": image_tree, "cache": cache_dir, "before": before, **entries,
            "key": key, "prefix": key[:6]}


IMG = ["--crop", "32", "--resize", "36", "--quiet"]
R18 = ["extract", "--ckpt", "{t}/r18-3.pt", "--arch", "resnet18"]
CASES = {
    # docs/reliability.md: checkpoints, data, lists, images, splits, features, format version
    "missing checkpoint": (["extract", "--ckpt", "{t}/nope.pt", "--data", "digits-lt"], "nope.pt does not exist"),
    "unreadable checkpoint": (["extract", "--ckpt", "{t}/a-directory.pt", "--data", "digits-lt"], "cannot be read"),
    "not a checkpoint": (["extract", "--ckpt", "{t}/not-a-ckpt.pt", "--data", "digits-lt"], "not a PyTorch checkpoint"),
    "other arch": (["extract", "--ckpt", "{ckpt}", "--arch", "resnet18", "--data", "digits-lt"], "missing keys"),
    "data root missing": (["extract", "--ckpt", "{ckpt}", "--data", "fashion-mnist-lt", "--data-root", "{t}/nowhere"],
                          "{t}/nowhere does not exist"),
    "malformed list line": (R18 + ["--data", "txt", "--data-root", "{images}", "--list", "train={t}/list.txt"],
                            "list.txt:2"),
    "list label out of range": (R18 + ["--data", "txt", "--data-root", "{images}", "--list", "train={t}/labels.txt"],
                                "label 7, out of range"),
    "undecodable image": (R18 + ["--data", "imagefolder", "--data-root", "{t}/broken"] + IMG, "bad.png"),
    "empty split": (R18 + ["--data", "txt", "--data-root", "{images}", "--list", "train={t}/empty.txt"], "is empty"),
    "nan features": (["extract", "--ckpt", "{t}/nan.pt", "--data", "digits-lt", "--quiet"], "non-finite features"),
    "unknown data": (["extract", "--ckpt", "{ckpt}", "--data", "imagenet"], "unknown --data 'imagenet'"),
    "unknown split": (["extract", "--ckpt", "{ckpt}", "--data", "digits-lt", "--split", "holdout"], "no split 'holdout'"),
    "unknown arch": (["extract", "--ckpt", "{ckpt}", "--arch", "vit-huge", "--data", "digits-lt"], "unknown --arch"),
    "unknown format version": (["info", "{future}"], "format_version 99"),
    "import dim mismatch": (["import", "--name", "m", "--split", "train={t}/d4.npz", "--split", "val={t}/d5.npz"],
                            "feature-dim mismatch"),
    "import classifier dim mismatch": (["import", "--name", "m", "--split", "train={t}/d4.npz", "--classifier",
                                        "{ckpt}"], "feature-dim mismatch"),
    "import nan": (["import", "--name", "m", "--split", "train={t}/nan.npz"], "NaN or Inf"),
    "import negative label": (["import", "--name", "m", "--split", "train={t}/negative.npz"], "negative label -3"),
    "import unknown file type": (["import", "--name", "m", "--split", "train={t}/feats.csv"], "unknown feature file type"),
    "import missing file": (["import", "--name", "m", "--split", "train={t}/gone.npz"], "gone.npz does not exist"),
    "import split without file": (["import", "--name", "m", "--split", "train"], "expected NAME=VALUE"),
    # issue 11
    "import huge label": (["import", "--name", "m", "--split", "train={t}/huge-label.npz"], "not a class index"),
    "import float16 overflow": (["import", "--name", "m", "--dtype", "float16", "--split", "train={t}/f16.npz"],
                                "cannot be stored as float16"),
    "extract float16 overflow": (["extract", "--ckpt", "{t}/big.pt", "--data", "digits-lt", "--dtype", "float16",
                                  "--quiet"], "cannot be stored as float16"),
    "crafted pickle": (["import", "--name", "m", "--split", "train={t}/crafted.pkl"], "--trust-pickle"),
    "crafted feature .pt": (["import", "--name", "m", "--split", "train={t}/crafted-feats.pt"], "--trust-pickle"),
    "crafted checkpoint": (["extract", "--ckpt", "{t}/crafted.pth", "--data", "digits-lt"], "--trust-checkpoint"),
    "crafted classifier": (["import", "--name", "m", "--split", "train={t}/d4.npz", "--classifier", "{t}/crafted.pth"],
                           "--trust-checkpoint"),
    "crafted resume": (["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "1", "--out", "{t}/run",
                        "--resume", "--quiet"], "--trust-checkpoint"),
    "grayscale checkpoint on RGB": (["extract", "--ckpt", "{ckpt}", "--data", "imagefolder", "--data-root",
                                     "{images}"] + IMG, "1-channel (grayscale)"),
    "hash-images on generated data": (["extract", "--ckpt", "{ckpt}", "--data", "digits-lt", "--hash-images"],
                                      "--hash-images applies to"),
    "rm empty": (["rm", ""], "'' does not name a cache entry"),
    "rm dot": (["rm", "."], "'.' does not name a cache entry"),
    "rm plain directory": (["rm", "{t}/plain-dir"], "is not a cache entry"),
    "rm symlinked entry": (["rm", "linked"], "symbolic link"),
    "rm unknown name": (["rm", "nothing-like-this"], "no cache entry 'nothing-like-this'"),
    "info damaged manifest": (["info", "{damaged}"], "manifest.json is not valid JSON"),
    "cache-dir is a file (ls)": (["ls", "--cache-dir", "{t}/file-not-dir"], "is not a directory"),
    "cache-dir is a file (extract)": (["extract", "--ckpt", "{ckpt}", "--data", "digits-lt", "--cache-dir",
                                       "{t}/file-not-dir"], "is not a directory"),
    "cache-dir is a file (import)": (["import", "--name", "m", "--split", "train={t}/d4.npz", "--cache-dir",
                                      "{t}/file-not-dir"], "is not a directory"),
    "verify without entry": (["verify"], "give an ENTRY or --all"),
    # issue 26
    "old-format checkpoint needing unpickling": (["extract", "--ckpt", "{t}/legacy.pth", "--data", "digits-lt"],
                                                 "--trust-checkpoint"),
    "old-format protocol-4 checkpoint": (["extract", "--ckpt", "{t}/legacy-p4.pth", "--data", "digits-lt"],
                                         "old-format (non-zip) PyTorch file"),
    "hf-hub revision not cached": (["extract", "--ckpt", "hf-hub:org/weights@v2", "--data", "digits-lt"],
                                   "at revision 'v2'"),
    "hf-hub empty revision": (["extract", "--ckpt", "hf-hub:org/weights@", "--data", "digits-lt"],
                              "'' is not a revision"),
    "hf-hub bad repo": (["extract", "--ckpt", "hf-hub:org/wei ghts", "--data", "digits-lt"], "expected hf-hub:ORG/NAME"),
    "hf-hub dangling weights link": (["extract", "--ckpt", "hf-hub:org/weights", "--data", "digits-lt"],
                                     "snapshots/abc123/model.safetensors is a broken link"),
    "hf-hub dangling weights link at a commit": (["extract", "--ckpt", "hf-hub:org/weights@abc123", "--data",
                                                  "digits-lt"], "model.safetensors is a broken link"),
    "list not UTF-8": (R18 + ["--data", "txt", "--data-root", "{images}", "--list", "train={t}/latin1.txt"],
                       "latin1.txt is not UTF-8 text (line 2"),
    "list label in Arabic-Indic digits": (R18 + ["--data", "txt", "--data-root", "{images}", "--list",
                                                 "train={t}/arabic-digit.txt"], "arabic-digit.txt:2: expected"),
    "list label superscript": (R18 + ["--data", "txt", "--data-root", "{images}", "--list",
                                      "train={t}/superscript.txt"], "superscript.txt:1: expected"),
    "import empty name": (["import", "--name", "", "--split", "train={t}/d4.npz"], "--name '': a name is"),
    "import name dot": (["import", "--name", ".", "--split", "train={t}/d4.npz"], "--name '.'"),
    "import name dotdot": (["import", "--name", "..", "--split", "train={t}/d4.npz"], "--name '..'"),
    "import name with slash": (["import", "--name", "x/y", "--split", "train={t}/d4.npz"], "--name 'x/y'"),
    "import name taken": (["import", "--name", "future", "--split", "train={t}/d5.npz"], "already names entry"),
    "import name taken by a damaged entry": (["import", "--name", "linked", "--split", "train={t}/d5.npz"],
                                             "already names entry"),
    "import name is a key": (["import", "--name", "{key}", "--split", "train={t}/d5.npz"], "reads as a cache key"),
    "import name is a key prefix": (["import", "--name", "{prefix}", "--split", "train={t}/d5.npz"],
                                    "prefix of) the key of entry {key}"),
    "info damaged entry by key prefix": (["info", "{prefix}"], "manifest.json is not valid JSON"),
    "verify damaged entry by key prefix": (["verify", "{prefix}"], "manifest.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_error_line(case, world, runner, monkeypatch):
    args, message = CASES[case]
    monkeypatch.chdir(world["t"])
    fill = {k: v for k, v in world.items() if k != "before"}
    result = runner.invoke(featcache, [a.format(**fill) for a in args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message.format(**fill) in errors[0], result.output
    if case != "verify without entry":  # a usage error also prints the usage line
        assert [line for line in result.output.splitlines() if line.strip()] == errors, result.output
    assert sorted(p.name for p in world["cache"].iterdir()) == world["before"]  # nothing half-written
    assert not (world["t"] / "pwned").exists()
    assert (world["t"] / "plain-dir" / "keep.txt").is_file() and (world["t"] / "moved" / "manifest.json").is_file()


def test_torch_warnings_about_a_file_do_not_reach_the_user(world, runner):
    """torch warns "Detected pickle protocol 4" while refusing an old-format file; the user sees one line."""
    import warnings
    for name in ("legacy-p4.pth", "legacy.pth"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(featcache, ["extract", "--ckpt", str(world["t"] / name), "--data", "digits-lt"])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert not [w for w in caught if "pickle protocol" in str(w.message)], [str(w.message) for w in caught]
        assert "--trust-checkpoint" in result.output and not (world["t"] / "pwned").exists()
