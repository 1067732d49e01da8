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
    assert np.abs(cpu - gpu).max() <= 1e-4 * np.abs(cpu).max()


def test_train_on_cuda_with_amp(tmp_path, runner):
    out = tmp_path / "run"
    invoke(runner, featcache, ["train", "--data", "digits-lt", "--arch", "tinycnn", "--epochs", "2", "--device", "cuda",
                               "--out", out, "--quiet"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
