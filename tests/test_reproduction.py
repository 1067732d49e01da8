"""The core finding of the paper on real Fashion-MNIST-LT, CI-sized (one seed, four epochs)."""
from pathlib import Path

import pytest

from classifiers.records import load_records
from cli.featcache_cmd import main as featcache
from cli.lt_cls_cmd import main as lt_cls
from featcache.datasets import FASHION_MNIST_ROOT
from tests.conftest import invoke

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")


def test_decoupling_beats_joint_on_fashion_mnist_lt(tmp_path, cache_dir, runner):
    data = ["--data", "fashion-mnist-lt", "--max-per-class", "5000", "--imbalance", "500", "--val-per-class", "20"]
    ckpt = invoke(runner, featcache, ["train", *data, "--arch", "tinycnn", "--sampler", "instance", "--epochs", "4",
                                      "--out", tmp_path / "ib", "--quiet"]).output.split()[-1]
    entry = invoke(runner, featcache, ["extract", "--ckpt", ckpt, "--quiet"]).output.split()[-1]
    invoke(runner, lt_cls, ["sweep", "--cache", entry, "--methods", "joint,crt,tau", "--param", "tau.tau=auto",
                            "--out", tmp_path / "sweep", "--quiet", "--no-plots"])
    result = {r["method"]: r for r in load_records(tmp_path / "sweep" / "results.jsonl")}
    joint, crt, tau = result["joint"], result["crt"], result["tau"]
    assert (joint["n_many"], joint["n_medium"], joint["n_few"]) == (6, 2, 2)
    assert crt["top1"] > joint["top1"] + 5, (crt["top1"], joint["top1"])
    assert tau["top1"] > joint["top1"], (tau["top1"], joint["top1"])
    assert crt["few"] > joint["few"] + 30, (crt["few"], joint["few"])
    assert tau["selected_on"] == "val"
