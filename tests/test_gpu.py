"""The CUDA paths, compared with the CPU; skipped on machines without a GPU."""
import numpy as np
import pytest
import torch

import classifiers
from classifiers import create
from cli.featcache_cmd import main as featcache
from featcache import FeatureCache
from tests.conftest import invoke
from tests.synthetic import long_tailed_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("name", list(classifiers.REGISTRY))
def test_estimators_on_cuda_agree_with_cpu(name):
    data = long_tailed_features()
    (X, y), (Xt, _) = data["train"], data["test"]
    kwargs = dict(class_counts=data["counts"], classifier=(data["W"], data["b"]), val=data["val"])
    cpu = create(name, device="cpu").fit(X, y, **kwargs).predict(Xt)
    gpu = create(name, device="cuda").fit(X, y, **kwargs).predict(Xt)
    assert np.mean(cpu == gpu) > 0.97


def test_extract_on_cuda_matches_cpu(tiny_ckpt, tmp_path, runner):
    paths = [invoke(runner, featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--device", device,
                                        "--cache-dir", tmp_path / device, "--quiet"]).output.split()[-1]
             for device in ("cpu", "cuda")]
    cpu, gpu = (FeatureCache.open(p).split("test").features for p in paths)
    # cuDNN convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32): a 10-bit mantissa,
    # about 1e-3 relative; the first H200 run measured 5.5e-4 of the largest feature
    assert np.abs(cpu - gpu).max() <= 2e-3 * np.abs(cpu).max()


def test_train_on_cuda_with_amp(tmp_path, runner):
    out = tmp_path / "run"
    invoke(runner, featcache, ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "2", "--device", "cuda",
                               "--out", out, "--quiet"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("name", ["ncm", "knn", "crt", "tau", "lws", "disalign", "marc"])
def test_float16_features_stay_float16_on_cuda_and_agree(name):
    data = long_tailed_features()
    (X, y), (Xt, _) = data["train"], data["test"]
    kwargs = dict(class_counts=data["counts"], classifier=(data["W"], data["b"]), val=data["val"])
    full = create(name, device="cuda").fit(X, y, **kwargs).predict(Xt)
    half = create(name, device="cuda").fit(torch.from_numpy(X).half().cuda(), y, **kwargs)
    assert np.mean(half.predict(torch.from_numpy(Xt).half().cuda()) == full) > 0.95


@pytest.mark.parametrize("name", ["lws", "disalign", "marc"])
def test_frozen_logit_cache_on_and_off_on_cuda(name):
    data = long_tailed_features()
    (X, y), (Xt, _) = data["train"], data["test"]
    kwargs = dict(class_counts=data["counts"], classifier=(data["W"], data["b"]))
    cached = create(name, device="cuda", memory_budget=10**15).fit(X, y, **kwargs)
    recomputed = create(name, device="cuda", memory_budget=0).fit(X, y, **kwargs)
    np.testing.assert_allclose(recomputed.logits(Xt), cached.logits(Xt), rtol=1e-3, atol=1e-4)


def test_two_representation_sweep_on_cuda_matches_cpu(tmp_path, cache_dir, runner):
    from classifiers.records import load_records
    from cli.lt_cls_cmd import main as lt_cls
    entries = []
    for seed in (0, 1):
        data = long_tailed_features(seed=seed)
        args = ["import", "--name", f"rep{seed}", "--dtype", "float16"]
        for split in ("train", "val", "test"):
            np.savez(tmp_path / f"{split}{seed}.npz", features=data[split][0], labels=data[split][1])
            args += ["--split", f"{split}={tmp_path / f'{split}{seed}.npz'}"]
        torch.save({"fc.weight": torch.from_numpy(data["W"]), "fc.bias": torch.from_numpy(data["b"])},
                   tmp_path / f"clf{seed}.pth")
        entries.append(invoke(runner, featcache, args + ["--classifier", tmp_path / f"clf{seed}.pth"]).output.split()[-1])
    top1 = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        invoke(runner, lt_cls, ["sweep", "--cache", entries[0], "--cache", entries[1], "--methods",
                                "joint,ncm,crt,tau,lws", "--param", "tau.tau=auto", "--device", device,
                                "--out", out, "--quiet", "--no-plots"])
        top1[device] = {(r["representation"], r["method"]): r["top1"] for r in load_records(out / "results.jsonl")}
    assert top1["cpu"].keys() == top1["cuda"].keys() and len(top1["cpu"]) == 10
    for key, value in top1["cpu"].items():
        assert abs(top1["cuda"][key] - value) <= 2.0, (key, value, top1["cuda"][key])


@pytest.mark.parametrize("name", ["crt", "la_loss", "ldam_drw", "las", "lws", "marc", "disalign"])
def test_stacked_trials_on_cuda_equal_separate_cuda_runs(name):
    """Stacked heads on the GPU (one batched matmul for the stack) against each trial fitted alone
    there: the issue's 3 lrs x 2 epoch counts."""
    from classifiers.stacking import fit_together
    data = long_tailed_features(num_classes=20, dim=24, max_count=400, imbalance=50, test_per_class=100, seed=3)
    (X, y), (Xt, _) = data["train"], data["test"]
    kwargs = dict(class_counts=data["counts"], classifier=(data["W"], data["b"]), val=data["val"])
    trials = [{"lr": lr, "epochs": e} for lr in (0.05, 0.2, 0.8) for e in (3, 8)]
    alone = [create(name, device="cuda", **p).fit(X, y, **kwargs) for p in trials]
    together = fit_together([create(name, device="cuda", **p) for p in trials], X, y, **kwargs)
    for a, b in zip(alone, together):
        la, lb = a.logits(Xt), b.logits(Xt)
        assert (la.argmax(1) == lb.argmax(1)).mean() >= 0.999
        np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4 * np.abs(la).max())
