"""Data-set loaders on small files made here: CIFAR python pickles, IDX files, txt lists; declared
options; the transforms whose descriptions go into the cache key."""
import gzip
import pickle
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from cli.featcache_cmd import main as featcache
from featcache.batches import augmented_transform, iterate_batches, resolve_view_transform
from featcache.datasets import (DATASET_OPTIONS, DATASETS, DataSpec, dataset_options, load_digits_lt, long_tail_counts,
                                parse_list_file, read_idx)
from featcache.errors import FeatcacheError
from featcache.store import content_key
from featcache.transforms import Normalize, RandomCrop


def write_cifar10(root, per_class_train=30, per_class_test=5):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(labels)
    chunks = np.array_split(np.arange(len(labels)), 5)
    images = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    for i, rows in enumerate(chunks, start=1):
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump({b"data": images[rows], b"labels": labels[rows].tolist()}, handle)
    test_labels = np.repeat(np.arange(10), per_class_test)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": rng.integers(0, 256, size=(len(test_labels), 3072), dtype=np.uint8),
                     b"labels": test_labels.tolist()}, handle)
    return images, labels


def test_cifar10_lt_from_pickles(tmp_path):
    images, labels = write_cifar10(tmp_path)
    source = DataSpec("cifar10-lt", str(tmp_path), {"max_per_class": 20, "imbalance": 10, "val_per_class": 2}).load()
    train = source.split("train")
    assert train.class_counts(10).tolist() == long_tail_counts(10, 20, 10, "exp")
    assert train.images.shape[1:] == (32, 32, 3) and len(source.split("test")) == 50
    first = train.ids[0]  # CHW pickle rows become HWC images
    np.testing.assert_array_equal(train.images[0], images[first].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.labels[0] == labels[first]
    assert set(source.split("val").ids).isdisjoint(train.ids)


def test_cifar100_lt_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, per in (("train", 6), ("test", 2)):
        fine = np.repeat(np.arange(100), per)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
                         b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}, handle)
    source = DataSpec("cifar100-lt", str(tmp_path), {"max_per_class": 5, "imbalance": 5}).load()
    assert source.num_classes == 100 and "val" not in source.splits
    assert source.split("train").class_counts(100).tolist() == long_tail_counts(100, 5, 5, "exp")


def test_cifar_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FeatcacheError, match="data_batch_3"):
        DataSpec("cifar10-lt", str(tmp_path)).load()


def test_idx_reader_and_mnist_lt(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 50)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    source = DataSpec("mnist-lt", str(tmp_path), {"max_per_class": 30, "imbalance": 10, "val_per_class": 5}).load()
    assert source.split("train").class_counts(10).tolist() == long_tail_counts(10, 30, 10, "exp")
    assert source.augment == "crop"  # no flips for digits


def test_list_parser_names_file_and_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a/b.jpg 3\n\nc d.jpg 4\nbroken\n")
    with pytest.raises(FeatcacheError, match="list.txt:4"):
        parse_list_file(path)
    path.write_text("a/b.jpg 3\nc d.jpg 4\n")
    assert parse_list_file(path) == [("a/b.jpg", 3), ("c d.jpg", 4)]


# -- declared options ------------------------------------------------------------------------------


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_misspelled_option_is_refused_from_python():
    for load in (DataSpec("digits-lt", options={"imbalanse": 2.0}).load, lambda: load_digits_lt(imbalanse=2.0),
                 DataSpec.from_dict({"name": "digits-lt", "options": {"imbalanse": 2.0}}).load):  # as a checkpoint records it
        with pytest.raises(FeatcacheError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith("data set 'digits-lt' has no option 'imbalanse' (did you mean 'imbalance'?); "
                                  "its options: max_per_class, imbalance,")


def test_an_option_of_another_data_set_is_refused():
    with pytest.raises(FeatcacheError, match="data set 'mnist-lt' has no option 'test_per_class'"):
        DataSpec("mnist-lt", "/nowhere", {"test_per_class": 5}).load()  # before the root is looked at
    with pytest.raises(FeatcacheError, match="'imagefolder' has no option 'imbalance'; its options: resize, crop, "
                                             "hash_images$"):
        DataSpec("imagefolder", "/nowhere", {"imbalance": 10}).load()


def test_every_option_passed_today_is_declared():
    cli_options = {"imbalance", "max_per_class", "profile", "class_order", "order_seed", "val_per_class", "resize",
                   "crop", "hash_images", "lists"}
    declared = {name: set(dataset_options(name, {}).__dataclass_fields__) for name in DATASETS}
    assert set(DATASET_OPTIONS) == set(DATASETS)
    assert cli_options <= set().union(*declared.values())
    for name, options in declared.items():  # timm / open_clip backbones read --resize / --crop on any data
        assert {"resize", "crop"} <= options, name
    assert {"test_per_class"} <= declared["digits-lt"] and {"lists", "num_classes"} <= declared["txt"]
    assert load_digits_lt(resize=64, crop=56).identity == load_digits_lt().identity  # the backbone's, not the data's


def test_an_undeclared_option_is_refused_from_the_cli(runner, tiny_ckpt, cache_dir):
    line = one_error_line(runner.invoke(featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt",
                                                    "--list", "train=a.txt"]))
    assert line.startswith("Error: data set 'digits-lt' has no option 'lists'; its options: max_per_class")
    misspelled = runner.invoke(featcache, ["extract", "--ckpt", tiny_ckpt, "--data", "digits-lt", "--imbalanse", "2"])
    assert misspelled.exit_code == 2 and "No such option" in misspelled.output and "--imbalanse" in misspelled.output
    assert not cache_dir.exists()


# -- transforms: what the cache key records ----------------------------------------------------------

DIGITS_EVAL = "ToTensor,Normalize((0.3,),(0.37,))"


def test_digits_lt_transform_descriptions_and_key_are_unchanged():
    """The strings and the key of the code before transforms were objects: old caches stay hits."""
    source = DataSpec("digits-lt").load()
    assert source.transform_description == DIGITS_EVAL
    assert resolve_view_transform(source, "crop-flip") == ("crop-flip", f"{DIGITS_EVAL},RandomCrop(pad=1),RandomHorizontalFlip")
    assert resolve_view_transform(source, "flip") == ("flip", f"{DIGITS_EVAL},RandomHorizontalFlip")
    assert source.identity == {"name": "digits-lt", "source": "sklearn.datasets.load_digits", "max_per_class": 120,
                               "imbalance": 30.0, "profile": "exp", "class_order": "natural", "order_seed": 0,
                               "val_per_class": 10, "test_per_class": 40, "split_seed": 0}
    assert content_key({"data": source.identity, "transform": source.transform_description}) == "d2d2b5375972a59a62df8cd7"


def test_cifar_and_image_file_transform_descriptions_are_unchanged(tmp_path, image_tree):
    write_cifar10(tmp_path)
    cifar = DataSpec("cifar10-lt", str(tmp_path), {"max_per_class": 20, "imbalance": 10, "val_per_class": 2}).load()
    normalize = "Normalize((0.4914, 0.4822, 0.4465),(0.247, 0.2435, 0.2616))"
    assert cifar.transform_description == f"ToTensor,{normalize}"
    assert resolve_view_transform(cifar, "default") == (
        "crop-flip", f"ToTensor,{normalize},RandomCrop(pad=4),RandomHorizontalFlip")
    files = DataSpec("imagefolder", str(image_tree)).load()
    imagenet = "ToTensor,Normalize((0.485, 0.456, 0.406),(0.229, 0.224, 0.225))"
    assert files.transform_description == f"Resize(256),CenterCrop(224),{imagenet}"
    assert resolve_view_transform(files, "default") == (
        "official", f"RandomResizedCrop(224),RandomHorizontalFlip,ColorJitter(0.4,0.4,0.4,0),{imagenet}")
    assert resolve_view_transform(files, "flip")[1] == f"Resize(256),CenterCrop(224),RandomHorizontalFlip,{imagenet}"


def test_a_changed_transform_parameter_changes_the_key_and_the_batches():
    source = DataSpec("digits-lt").load()
    val = source.split("val")
    key = content_key({"data": source.identity, "transform": source.transform_description})
    shifted = replace(source, normalize=Normalize((0.5,), (0.37,)))
    assert shifted.transform_description == "ToTensor,Normalize((0.5,),(0.37,))"
    assert content_key({"data": shifted.identity, "transform": shifted.transform_description}) != key
    images = [next(iterate_batches(s, val, np.arange(4), 4))[0] for s in (source, shifted)]
    pixels = torch.from_numpy(val.images[:4]).float().div(255.0).unsqueeze(1)
    torch.testing.assert_close(images[0], (pixels - 0.30) / 0.37)  # what the batches apply is what the key says
    torch.testing.assert_close(images[1], (pixels - 0.5) / 0.37)
    crop = augmented_transform(source, "crop")
    assert crop.steps[-1] == RandomCrop(padding=1)
    wider = replace(crop, steps=(*crop.steps[:-1], RandomCrop(padding=2)))
    assert wider.description == f"{DIGITS_EVAL},RandomCrop(pad=2)" != crop.description
