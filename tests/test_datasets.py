"""Data-set loaders on small files made here: CIFAR python pickles, IDX files, txt lists."""
import gzip
import pickle
import struct

import numpy as np
import pytest

from featcache.datasets import DataSpec, long_tail_counts, parse_list_file, read_idx
from featcache.errors import FeatcacheError


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
