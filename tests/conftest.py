import numpy as np
import pytest
import torch
from click.testing import CliRunner


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FEATCACHE_DIR", str(path))
    return path


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def image_tree(tmp_path):
    """A small ImageFolder tree: train/val/test x 3 classes of random RGB images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, per_class in (("train", (5, 3, 1)), ("val", (2, 2, 2)), ("test", (2, 2, 2))):
        for cls, n in enumerate(per_class):
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(40 + 3 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


@pytest.fixture
def tiny_ckpt(tmp_path):
    """This project's minimal checkpoint format for tinycnn on digits-lt."""
    from featcache.backbones import build_model
    torch.manual_seed(0)
    model = build_model("tinycnn", 10, 1)
    path = tmp_path / "tiny.pt"
    torch.save({"arch": "tinycnn", "state_dict": model.state_dict()}, path)
    return path


def invoke(runner, command, args):
    """Run a click command, failing the test with its output if it does not exit 0."""
    result = runner.invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result
