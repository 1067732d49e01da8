"""Long-tailed data sets: generated ones (digits-lt, mnist-lt, fashion-mnist-lt, cifar10/100-lt)
and user trees (imagefolder, txt lists). Every data set is deterministic given its options and
has an ``identity`` (what the cache key hashes) and per-split sample ids, in ascending order.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FeatcacheError
from .safe_pickle import load_restricted

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass
class SplitSamples:
    """The samples of one split: labels and sample ids, plus either images or file paths."""

    name: str
    labels: np.ndarray
    ids: np.ndarray
    images: np.ndarray | None = None  # uint8, N x H x W (gray) or N x H x W x 3
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)


@dataclass
class DataSource:
    """A loaded data set: its splits and how to turn samples into tensors."""

    name: str
    num_classes: int
    splits: dict[str, SplitSamples]
    identity: dict
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    augment: str = "none"  # none | flip | crop | crop-flip | natural
    resize: int | None = None
    class_names: list[str] = field(default_factory=list)

    def split(self, name: str) -> SplitSamples:
        if name not in self.splits:
            raise FeatcacheError(f"data set {self.name!r} has no split {name!r} "
                                 f"(it has: {', '.join(self.splits)})")
        samples = self.splits[name]
        if len(samples) == 0:
            raise FeatcacheError(f"split {name!r} of data set {self.name!r} is empty")
        return samples

    @property
    def transform_description(self) -> str:
        if self.resize:
            return (f"Resize({self.resize}),CenterCrop({self.image_size}),ToTensor,"
                    f"Normalize({self.mean},{self.std})")
        return f"ToTensor,Normalize({self.mean},{self.std})"


# ---------------------------------------------------------------------------------------------
# Long-tail profiles


def long_tail_counts(num_classes: int, max_per_class: int, imbalance: float, profile: str) -> list[int]:
    """Per-class counts, head first. exp: n_i = floor(max * (1/imb)^(i/(C-1))); step: half at max,
    half at max/imb."""
    if imbalance < 1:
        raise FeatcacheError(f"--imbalance must be >= 1 (got {imbalance})")
    if profile == "exp":
        return [int(max_per_class * (1.0 / imbalance) ** (i / max(1, num_classes - 1)))
                for i in range(num_classes)]
    if profile == "step":
        head = num_classes // 2
        return [max_per_class if i < head else int(max_per_class / imbalance) for i in range(num_classes)]
    raise FeatcacheError(f"--profile {profile!r}: choose exp or step")


def class_order(num_classes: int, order: str, order_seed: int) -> np.ndarray:
    """order[i] = the class that gets the i-th largest count."""
    if order == "natural":
        return np.arange(num_classes)
    if order == "shuffled":
        return np.random.default_rng(order_seed).permutation(num_classes)
    raise FeatcacheError(f"--class-order {order!r}: choose natural or shuffled")


def carve_long_tail(labels: np.ndarray, num_classes: int, counts_by_rank: list[int],
                    order: np.ndarray, val_per_class: int, split_seed: int,
                    test_per_class: int = 0) -> dict[str, np.ndarray]:
    """Pick sample ids from a pool: per class, shuffle (split_seed), take test, then val, then train."""
    rng = np.random.default_rng(split_seed)
    picked = {"train": [], "val": [], "test": []}
    for rank, cls in enumerate(order):
        pool = rng.permutation(np.flatnonzero(labels == cls))
        need = counts_by_rank[rank] + val_per_class + test_per_class
        if need > len(pool):
            raise FeatcacheError(
                f"class {cls} has {len(pool)} images, but {counts_by_rank[rank]} train + "
                f"{val_per_class} val + {test_per_class} test were asked for (lower --max-per-class)")
        picked["test"].append(pool[:test_per_class])
        picked["val"].append(pool[test_per_class:test_per_class + val_per_class])
        picked["train"].append(pool[test_per_class + val_per_class:need])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in picked.items()}


def _array_split(name, ids, labels, images) -> SplitSamples:
    return SplitSamples(name, labels[ids].astype(np.int64), ids, images=images[ids])


# ---------------------------------------------------------------------------------------------
# Readers


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``*-ubyte`` or ``*-ubyte.gz``) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
        magic = struct.unpack(">I", raw[:4])[0]
    except (OSError, struct.error, EOFError) as exc:
        raise FeatcacheError(f"{path} is not a readable IDX file ({exc})") from None
    if magic >> 8 != 0x08:
        raise FeatcacheError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def _find_file(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        for candidate in (root / name, root / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise FeatcacheError(f"--data-root {root}: no {what} file ({' or '.join(names)}[.gz])")


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _require_root(data_root, default: str | None, name: str) -> Path:
    root = Path(data_root or default or "")
    if not (data_root or default):
        raise FeatcacheError(f"--data {name} needs --data-root")
    if not root.is_dir():
        raise FeatcacheError(f"--data-root {root} does not exist or is not a directory")
    return root


# ---------------------------------------------------------------------------------------------
# Data sets


def _load_generated(name, pool_images, pool_labels, test_images, test_labels, num_classes, *,
                    identity, max_per_class, imbalance, profile, order, order_seed,
                    val_per_class, split_seed, test_per_class, channels, size, augment,
                    mean, std) -> DataSource:
    counts = long_tail_counts(num_classes, max_per_class, imbalance, profile)
    perm = class_order(num_classes, order, order_seed)
    carved = carve_long_tail(pool_labels, num_classes, counts, perm, val_per_class, split_seed,
                             test_per_class if test_images is None else 0)
    splits = {"train": _array_split("train", carved["train"], pool_labels, pool_images),
              "val": _array_split("val", carved["val"], pool_labels, pool_images)}
    if test_images is None:
        splits["test"] = _array_split("test", carved["test"], pool_labels, pool_images)
    else:
        ids = np.arange(len(test_labels), dtype=np.int64)
        splits["test"] = SplitSamples("test", test_labels.astype(np.int64), ids, images=test_images)
    if val_per_class == 0:
        del splits["val"]
    return DataSource(name, num_classes, splits, identity, channels, size, mean, std, augment)


def load_digits_lt(data_root=None, *, max_per_class=120, imbalance=30.0, profile="exp",
                   class_order="natural", order_seed=0, val_per_class=10, test_per_class=40,
                   split_seed=0, **_) -> DataSource:
    """scikit-learn's bundled 8x8 digits (no download), made long-tailed; val and test balanced."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    params = dict(max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                  class_order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                  test_per_class=test_per_class, split_seed=split_seed)
    identity = {"name": "digits-lt", "source": "sklearn.datasets.load_digits", **params}
    return _load_generated("digits-lt", images, labels, None, None, 10, identity=identity,
                           max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                           order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                           split_seed=split_seed, test_per_class=test_per_class, channels=1, size=8,
                           augment="none", mean=(0.30,), std=(0.37,))


def _load_idx_lt(name, default_root, mean, std, augment, data_root, *, max_per_class, imbalance,
                 profile, class_order, order_seed, val_per_class, split_seed) -> DataSource:
    root = _require_root(data_root, default_root, name)
    files = [_find_file(root, [f"{p}-{k}-idx{d}-ubyte"], f"{p} {k}")
             for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    train_x, train_y, test_x, test_y = (read_idx(f) for f in files)
    params = dict(max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                  class_order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                  split_seed=split_seed)
    identity = {"name": name, "files_sha256": _file_digest(files), **params}
    return _load_generated(name, train_x, train_y.astype(np.int64), test_x, test_y, 10,
                           identity=identity, max_per_class=max_per_class, imbalance=imbalance,
                           profile=profile, order=class_order, order_seed=order_seed,
                           val_per_class=val_per_class, split_seed=split_seed, test_per_class=0,
                           channels=1, size=28, augment=augment, mean=mean, std=std)


def load_fashion_mnist_lt(data_root=None, *, max_per_class=5000, imbalance=100.0, profile="exp",
                          class_order="natural", order_seed=0, val_per_class=20, split_seed=0,
                          **_) -> DataSource:
    """Fashion-MNIST IDX files (default root: Debian's dataset-fashion-mnist), long-tailed.

    Augmentation: horizontal flip, as in the reference recipe (docs/results.md)."""
    return _load_idx_lt("fashion-mnist-lt", FASHION_MNIST_ROOT, (0.286,), (0.353,), "flip",
                        data_root, max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                        class_order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                        split_seed=split_seed)


def load_mnist_lt(data_root=None, *, max_per_class=5000, imbalance=100.0, profile="exp",
                  class_order="natural", order_seed=0, val_per_class=20, split_seed=0, **_) -> DataSource:
    """MNIST IDX files from --data-root, long-tailed (random crop, no flip: digits are not symmetric)."""
    return _load_idx_lt("mnist-lt", None, (0.131,), (0.308,), "crop", data_root,
                        max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                        class_order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                        split_seed=split_seed)


def _unpickle(path: Path) -> dict:
    """A CIFAR batch: arrays and lists only (see featcache/safe_pickle.py); nothing in it runs."""
    try:
        payload = load_restricted(path, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FeatcacheError(f"{path} is not a CIFAR python pickle ({exc})") from None
    if not isinstance(payload, dict):
        raise FeatcacheError(f"{path} is not a CIFAR python pickle (it holds a {type(payload).__name__})")
    return payload


def _load_cifar_lt(name, num_classes, data_root, *, max_per_class, imbalance, profile, class_order,
                   order_seed, val_per_class, split_seed) -> DataSource:
    root = _require_root(data_root, None, name)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key = [folder / "test_batch"], b"labels"
    else:
        folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        train_files, test_files, label_key = [folder / "train"], [folder / "test"], b"fine_labels"
    for path in train_files + test_files:
        if not path.is_file():
            raise FeatcacheError(f"--data-root {root}: missing CIFAR file {path.name}")

    def read(paths):
        batches = [_unpickle(p) for p in paths]
        images = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
        return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    params = dict(max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                  class_order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                  split_seed=split_seed)
    identity = {"name": name, "files_sha256": _file_digest(train_files + test_files), **params}
    return _load_generated(name, train_x, train_y, test_x, test_y, num_classes, identity=identity,
                           max_per_class=max_per_class, imbalance=imbalance, profile=profile,
                           order=class_order, order_seed=order_seed, val_per_class=val_per_class,
                           split_seed=split_seed, test_per_class=0, channels=3, size=32,
                           augment="crop-flip", mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2470, 0.2435, 0.2616))


def load_cifar10_lt(data_root=None, *, max_per_class=5000, imbalance=100.0, profile="exp",
                    class_order="natural", order_seed=0, val_per_class=20, split_seed=0, **_):
    """CIFAR-10 python pickles in --data-root, long-tailed (usual exponential profile)."""
    return _load_cifar_lt("cifar10-lt", 10, data_root, max_per_class=max_per_class,
                          imbalance=imbalance, profile=profile, class_order=class_order,
                          order_seed=order_seed, val_per_class=val_per_class, split_seed=split_seed)


def load_cifar100_lt(data_root=None, *, max_per_class=500, imbalance=100.0, profile="exp",
                     class_order="natural", order_seed=0, val_per_class=0, split_seed=0, **_):
    """CIFAR-100 python pickles in --data-root, long-tailed (val off by default: 500 images/class)."""
    return _load_cifar_lt("cifar100-lt", 100, data_root, max_per_class=max_per_class,
                          imbalance=imbalance, profile=profile, class_order=class_order,
                          order_seed=order_seed, val_per_class=val_per_class, split_seed=split_seed)


def _file_fingerprint(path: Path, hash_contents: bool) -> list:
    """What the cache key records of one image: size and mtime_ns, or size and SHA-256."""
    try:
        stat = path.stat()
        if not hash_contents:
            return [stat.st_size, stat.st_mtime_ns]
        return [stat.st_size, _file_digest([path])]
    except OSError as exc:
        raise FeatcacheError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _file_source(name, splits_paths: dict[str, list[tuple[str, int]]], root: Path, num_classes: int,
                 resize: int, crop: int, class_names: list[str], hash_images: bool) -> DataSource:
    """The key covers the resolved root and, per file, its relative path, label and fingerprint."""
    root = root.resolve()
    splits = {}
    digest = hashlib.sha256()
    for split, items in splits_paths.items():
        fingerprints = [[p, lbl, *_file_fingerprint(root / p, hash_images)] for p, lbl in items]
        digest.update(json.dumps([split, fingerprints]).encode())
        splits[split] = SplitSamples(split, np.array([lbl for _, lbl in items], dtype=np.int64),
                                     np.arange(len(items), dtype=np.int64),
                                     paths=[str(root / p) for p, _ in items])
    identity = {"name": name, "root": str(root), "num_classes": num_classes,
                "fingerprint": "size+sha256" if hash_images else "size+mtime_ns",
                "files_sha256": digest.hexdigest()}
    return DataSource(name, num_classes, splits, identity, 3, crop, IMAGENET_MEAN, IMAGENET_STD,
                      "natural", resize=resize, class_names=class_names)


def load_imagefolder(data_root=None, *, resize=256, crop=224, hash_images=False, **_) -> DataSource:
    """``DATA_ROOT/<split>/<class>/<image>``; classes are the train split's folders (else the first)."""
    root = _require_root(data_root, None, "imagefolder")
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not split_dirs:
        raise FeatcacheError(f"--data-root {root} has no split folders (expected <split>/<class>/<image>)")
    reference = root / "train" if (root / "train").is_dir() else split_dirs[0]
    classes = sorted(p.name for p in reference.iterdir() if p.is_dir())
    if not classes:
        raise FeatcacheError(f"{reference} has no class folders")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split_dir in split_dirs:
        items = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise FeatcacheError(f"{class_dir}: class {class_dir.name!r} is not among the "
                                     f"{len(classes)} classes of {reference}")
            items += [(f.relative_to(root).as_posix(), index[class_dir.name])
                      for f in sorted(class_dir.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
        splits[split_dir.name] = items
    return _file_source("imagefolder", splits, root, len(classes), resize, crop, classes, hash_images)


def parse_list_file(path: Path) -> list[tuple[str, int]]:
    """``relative/path.jpg <label>`` per line (ImageNet-LT / Places-LT / iNaturalist-2018 lists)."""
    if not path.is_file():
        raise FeatcacheError(f"list file {path} does not exist")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise FeatcacheError(f"{path}:{number}: expected '<relative path> <integer label>', "
                                 f"got {line.strip()!r}")
        label = int(parts[1])
        if label < 0:
            raise FeatcacheError(f"{path}:{number}: label {label} is negative")
        items.append((parts[0], label))
    return items


def load_txt(data_root=None, *, lists=None, num_classes=None, resize=256, crop=224, hash_images=False,
             **_) -> DataSource:
    """Text lists, one per split (``--list SPLIT=FILE``), paths relative to --data-root."""
    root = _require_root(data_root, None, "txt")
    if not lists:
        raise FeatcacheError("--data txt needs at least one --list SPLIT=FILE")
    parsed = {split: parse_list_file(Path(file)) for split, file in dict(lists).items()}
    for split, items in parsed.items():
        if not items:
            raise FeatcacheError(f"list file {dict(lists)[split]} (split {split!r}) is empty")
    reference = parsed.get("train") or next(iter(parsed.values()))
    classes = int(num_classes or max(lbl for _, lbl in reference) + 1)
    for split, items in parsed.items():
        for number, (_, label) in enumerate(items, start=1):
            if label >= classes:
                raise FeatcacheError(f"{dict(lists)[split]}: entry {number} has label {label}, out of "
                                     f"range for {classes} classes")
    return _file_source("txt", parsed, root, classes, resize, crop, [], hash_images)


DATASETS = {
    "digits-lt": load_digits_lt,
    "fashion-mnist-lt": load_fashion_mnist_lt,
    "mnist-lt": load_mnist_lt,
    "cifar10-lt": load_cifar10_lt,
    "cifar100-lt": load_cifar100_lt,
    "imagefolder": load_imagefolder,
    "txt": load_txt,
}

FILE_DATASETS = ("imagefolder", "txt")  # keyed on the root and each image's fingerprint


@dataclass
class DataSpec:
    """A data set request: a registered name, a root and options. Serialisable into checkpoints."""

    name: str
    root: str | None = None
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "root": self.root, "options": self.options}

    @classmethod
    def from_dict(cls, payload: dict) -> "DataSpec":
        return cls(payload["name"], payload.get("root"), dict(payload.get("options") or {}))

    def load(self) -> DataSource:
        if self.name not in DATASETS:
            raise FeatcacheError(f"unknown --data {self.name!r}; choose one of {', '.join(DATASETS)}")
        options = {k: v for k, v in self.options.items() if v is not None}
        return DATASETS[self.name](self.root, **options)
