"""Long-tailed data sets: generated ones (digits-lt, mnist-lt, fashion-mnist-lt, cifar10/100-lt)
and user trees (imagefolder, txt lists). Every data set is deterministic given its options and
has an ``identity`` (what the cache key hashes) and per-split sample ids, in ascending order.

Each data set declares its options as a frozen dataclass (:data:`DATASET_OPTIONS`); any other
option is a one-line error naming it, whether it comes from Python, the command line or the data
set a checkpoint recorded.
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .errors import FeatcacheError
from .safe_pickle import load_restricted
from .transforms import CenterCrop, Normalize, Resize, ToTensor, Transform

IMAGENET_NORMALIZE = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
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
    normalize: Normalize
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
    def in_memory(self) -> bool:
        """Whether the images are arrays (generated data sets) rather than files."""
        return any(samples.images is not None for samples in self.splits.values())

    @property
    def eval_transform(self) -> Transform:
        """Image files: resize, centre crop; then ToTensor and the data set's normalisation."""
        sizes = (Resize(self.resize), CenterCrop(self.image_size)) if self.resize else ()
        return Transform((*sizes, ToTensor(), self.normalize))

    @property
    def transform_description(self) -> str:
        return self.eval_transform.description


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


@dataclass(frozen=True, kw_only=True)
class LongTail:
    """How a generated data set's splits are carved from a pool of labelled images.

    The class of rank i (in ``class_order``) gets ``long_tail_counts(...)[i]`` training images and
    ``val_per_class`` val images; ``test_per_class`` test images too where the data set has no test
    files of its own (None: it has). Each class's pool is shuffled with ``split_seed``.
    """

    max_per_class: int
    imbalance: float
    profile: str
    class_order: str
    order_seed: int
    val_per_class: int
    test_per_class: int | None = None
    split_seed: int

    def identity(self) -> dict:
        """What the cache key records of the recipe (``test_per_class`` only where it applies)."""
        return {k: v for k, v in asdict(self).items() if not (k == "test_per_class" and v is None)}

    def carve(self, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
        """Sample ids per split: per class, shuffle (split_seed), take test, then val, then train."""
        counts = long_tail_counts(num_classes, self.max_per_class, self.imbalance, self.profile)
        order = class_order(num_classes, self.class_order, self.order_seed)
        test_per_class = self.test_per_class or 0
        rng = np.random.default_rng(self.split_seed)
        picked = {"train": [], "val": [], "test": []}
        for rank, cls in enumerate(order):
            pool = rng.permutation(np.flatnonzero(labels == cls))
            need = counts[rank] + self.val_per_class + test_per_class
            if need > len(pool):
                raise FeatcacheError(
                    f"class {cls} has {len(pool)} images, but {counts[rank]} train + "
                    f"{self.val_per_class} val + {test_per_class} test were asked for (lower --max-per-class)")
            picked["test"].append(pool[:test_per_class])
            picked["val"].append(pool[test_per_class:test_per_class + self.val_per_class])
            picked["train"].append(pool[test_per_class + self.val_per_class:need])
        return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in picked.items()}


# ---------------------------------------------------------------------------------------------
# Declared options


@dataclass(frozen=True, kw_only=True)
class LongTailOptions:
    """The options of mnist-lt, fashion-mnist-lt and cifar10-lt, with their defaults.

    Attributes
    ----------
    max_per_class : int
        Training images of the largest class.
    imbalance : float
        Largest over smallest training class count (at least 1).
    profile : {"exp", "step"}
        exp: n_i = max * imbalance^(-i / (C - 1)); step: half the classes at max, half at max / imbalance.
    class_order : {"natural", "shuffled"}
        Which classes become the head: 0, 1, ... or a permutation drawn with ``order_seed``.
    order_seed : int
        Seed of the shuffled class order.
    val_per_class : int
        Balanced val images per class, from the training images left over (0: no val split).
    split_seed : int
        Seed of the per-class shuffles that pick each split's images.
    resize, crop : int or None
        timm / open_clip backbones: the sizes of their eval transform (default: theirs). The data
        set's own transform does not resize.
    """

    max_per_class: int = 5000
    imbalance: float = 100.0
    profile: str = "exp"
    class_order: str = "natural"
    order_seed: int = 0
    val_per_class: int = 20
    split_seed: int = 0
    resize: int | None = None
    crop: int | None = None

    def long_tail(self) -> LongTail:
        return LongTail(max_per_class=self.max_per_class, imbalance=self.imbalance, profile=self.profile,
                        class_order=self.class_order, order_seed=self.order_seed,
                        val_per_class=self.val_per_class, split_seed=self.split_seed)


@dataclass(frozen=True, kw_only=True)
class Cifar100Options(LongTailOptions):
    """cifar100-lt's options: :class:`LongTailOptions`, 500 images in the largest class and no val split."""

    max_per_class: int = 500
    val_per_class: int = 0


@dataclass(frozen=True, kw_only=True)
class DigitsOptions(LongTailOptions):
    """digits-lt's options: :class:`LongTailOptions` with smaller defaults, and ``test_per_class``,
    the balanced test images per class (the digits come without a test split)."""

    max_per_class: int = 120
    imbalance: float = 30.0
    val_per_class: int = 10
    test_per_class: int = 40

    def long_tail(self) -> LongTail:
        return replace(super().long_tail(), test_per_class=self.test_per_class)


@dataclass(frozen=True, kw_only=True)
class ImageFolderOptions:
    """imagefolder's options.

    Attributes
    ----------
    resize : int
        Eval transform: resize the shorter side to this (timm / open_clip: replaces their resize).
    crop : int
        Eval transform: centre crop to this square, also the training crop's size (timm /
        open_clip: replaces their crop).
    hash_images : bool
        Key the cache on each image's SHA-256 instead of its size and mtime.
    """

    resize: int = 256
    crop: int = 224
    hash_images: bool = False


@dataclass(frozen=True, kw_only=True)
class TxtOptions(ImageFolderOptions):
    """txt's options: :class:`ImageFolderOptions`, and

    Attributes
    ----------
    lists : mapping of str to str
        A list file per split (``--list SPLIT=FILE``), paths in it relative to the data root.
    num_classes : int or None
        Default: the largest label of the train list (else the first list) plus one.
    """

    lists: Mapping[str, str] | None = None
    num_classes: int | None = None


def dataset_options(name: str, options: Mapping):
    """``options`` as data set ``name``'s declared options (an instance of ``DATASET_OPTIONS[name]``).

    An option the data set does not declare is a one-line :class:`FeatcacheError` that names it,
    suggests the closest declared one and lists them all."""
    declared = [f.name for f in fields(DATASET_OPTIONS[name])]
    for option in options:
        if option not in declared:
            close = difflib.get_close_matches(str(option), declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FeatcacheError(f"data set {name!r} has no option {option!r}{hint}; "
                                 f"its options: {', '.join(declared)}")
    return DATASET_OPTIONS[name](**options)


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


@dataclass(frozen=True)
class _Images:
    """Labelled images in memory: uint8 N x H x W (gray) or N x H x W x 3, and their labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class _GeneratedSet:
    """What a generated data set fixes: its name, classes, image shape, normalisation and its own
    training augmentation (none, flip, crop or crop-flip)."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    normalize: Normalize
    augment: str


DIGITS = _GeneratedSet("digits-lt", 10, 1, 8, Normalize((0.30,), (0.37,)), "none")
MNIST = _GeneratedSet("mnist-lt", 10, 1, 28, Normalize((0.131,), (0.308,)), "crop")  # digits are not symmetric
FASHION_MNIST = _GeneratedSet("fashion-mnist-lt", 10, 1, 28, Normalize((0.286,), (0.353,)), "flip")
_CIFAR_NORMALIZE = Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR10 = _GeneratedSet("cifar10-lt", 10, 3, 32, _CIFAR_NORMALIZE, "crop-flip")
CIFAR100 = _GeneratedSet("cifar100-lt", 100, 3, 32, _CIFAR_NORMALIZE, "crop-flip")


def _array_split(name: str, ids: np.ndarray, pool: _Images) -> SplitSamples:
    return SplitSamples(name, pool.labels[ids].astype(np.int64), ids, images=pool.images[ids])


def _load_generated(kind: _GeneratedSet, identity: dict, pool: _Images, test: _Images | None,
                    long_tail: LongTail) -> DataSource:
    """``kind``'s splits carved from ``pool`` by ``long_tail``; the test split is ``test`` where the
    data set has test files."""
    carved = long_tail.carve(pool.labels, kind.num_classes)
    splits = {"train": _array_split("train", carved["train"], pool),
              "val": _array_split("val", carved["val"], pool)}
    if test is None:
        splits["test"] = _array_split("test", carved["test"], pool)
    else:
        ids = np.arange(len(test.labels), dtype=np.int64)
        splits["test"] = SplitSamples("test", test.labels.astype(np.int64), ids, images=test.images)
    if long_tail.val_per_class == 0:
        del splits["val"]
    return DataSource(kind.name, kind.num_classes, splits, identity, kind.channels, kind.image_size,
                      kind.normalize, kind.augment)


def load_digits_lt(data_root=None, **options) -> DataSource:
    """scikit-learn's bundled 8x8 digits (no download), made long-tailed; val and test balanced.

    ``options``: :class:`DigitsOptions`; ``data_root`` is not used."""
    long_tail = dataset_options(DIGITS.name, options).long_tail()
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    identity = {"name": DIGITS.name, "source": "sklearn.datasets.load_digits", **long_tail.identity()}
    return _load_generated(DIGITS, identity, _Images(images, labels), None, long_tail)


def _load_idx_lt(kind: _GeneratedSet, default_root: str | None, data_root, options: LongTailOptions) -> DataSource:
    root = _require_root(data_root, default_root, kind.name)
    files = [_find_file(root, [f"{p}-{k}-idx{d}-ubyte"], f"{p} {k}")
             for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    train_x, train_y, test_x, test_y = (read_idx(f) for f in files)
    long_tail = options.long_tail()
    identity = {"name": kind.name, "files_sha256": _file_digest(files), **long_tail.identity()}
    return _load_generated(kind, identity, _Images(train_x, train_y.astype(np.int64)), _Images(test_x, test_y),
                           long_tail)


def load_fashion_mnist_lt(data_root=None, **options) -> DataSource:
    """Fashion-MNIST IDX files (default root: Debian's dataset-fashion-mnist), long-tailed.

    Augmentation: horizontal flip, as in the reference recipe (docs/results.md). ``options``:
    :class:`LongTailOptions`."""
    return _load_idx_lt(FASHION_MNIST, FASHION_MNIST_ROOT, data_root, dataset_options(FASHION_MNIST.name, options))


def load_mnist_lt(data_root=None, **options) -> DataSource:
    """MNIST IDX files from --data-root, long-tailed (random crop, no flip: digits are not symmetric).

    ``options``: :class:`LongTailOptions`."""
    return _load_idx_lt(MNIST, None, data_root, dataset_options(MNIST.name, options))


def _unpickle(path: Path) -> dict:
    """A CIFAR batch: arrays and lists only (see featcache/safe_pickle.py); nothing in it runs."""
    try:
        payload = load_restricted(path, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FeatcacheError(f"{path} is not a CIFAR python pickle ({exc})") from None
    if not isinstance(payload, dict):
        raise FeatcacheError(f"{path} is not a CIFAR python pickle (it holds a {type(payload).__name__})")
    return payload


def _load_cifar_lt(kind: _GeneratedSet, data_root, options: LongTailOptions) -> DataSource:
    root = _require_root(data_root, None, kind.name)
    if kind.num_classes == 10:
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key = [folder / "test_batch"], b"labels"
    else:
        folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        train_files, test_files, label_key = [folder / "train"], [folder / "test"], b"fine_labels"
    for path in train_files + test_files:
        if not path.is_file():
            raise FeatcacheError(f"--data-root {root}: missing CIFAR file {path.name}")

    def read(paths) -> _Images:
        batches = [_unpickle(p) for p in paths]
        images = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
        return _Images(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)

    pool, test = read(train_files), read(test_files)
    long_tail = options.long_tail()
    identity = {"name": kind.name, "files_sha256": _file_digest(train_files + test_files), **long_tail.identity()}
    return _load_generated(kind, identity, pool, test, long_tail)


def load_cifar10_lt(data_root=None, **options) -> DataSource:
    """CIFAR-10 python pickles in --data-root, long-tailed (usual exponential profile).

    ``options``: :class:`LongTailOptions`."""
    return _load_cifar_lt(CIFAR10, data_root, dataset_options(CIFAR10.name, options))


def load_cifar100_lt(data_root=None, **options) -> DataSource:
    """CIFAR-100 python pickles in --data-root, long-tailed (val off by default: 500 images/class).

    ``options``: :class:`Cifar100Options`."""
    return _load_cifar_lt(CIFAR100, data_root, dataset_options(CIFAR100.name, options))


def _file_fingerprint(path: Path, hash_contents: bool) -> list:
    """What the cache key records of one image: size and mtime_ns, or size and SHA-256."""
    try:
        stat = path.stat()
        if not hash_contents:
            return [stat.st_size, stat.st_mtime_ns]
        return [stat.st_size, _file_digest([path])]
    except OSError as exc:
        raise FeatcacheError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _file_source(name: str, root: Path, splits_paths: dict[str, list[tuple[str, int]]], num_classes: int,
                 options: ImageFolderOptions, class_names: list[str]) -> DataSource:
    """The key covers the resolved root and, per file, its relative path, label and fingerprint."""
    root = root.resolve()
    splits = {}
    digest = hashlib.sha256()
    for split, items in splits_paths.items():
        fingerprints = [[p, lbl, *_file_fingerprint(root / p, options.hash_images)] for p, lbl in items]
        digest.update(json.dumps([split, fingerprints]).encode())
        splits[split] = SplitSamples(split, np.array([lbl for _, lbl in items], dtype=np.int64),
                                     np.arange(len(items), dtype=np.int64),
                                     paths=[str(root / p) for p, _ in items])
    identity = {"name": name, "root": str(root), "num_classes": num_classes,
                "fingerprint": "size+sha256" if options.hash_images else "size+mtime_ns",
                "files_sha256": digest.hexdigest()}
    return DataSource(name, num_classes, splits, identity, 3, options.crop, IMAGENET_NORMALIZE, "natural",
                      resize=options.resize, class_names=class_names)


def load_imagefolder(data_root=None, **options) -> DataSource:
    """``DATA_ROOT/<split>/<class>/<image>``; classes are the train split's folders (else the first).

    ``options``: :class:`ImageFolderOptions`."""
    declared = dataset_options("imagefolder", options)
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
    return _file_source("imagefolder", root, splits, len(classes), declared, classes)


_LABEL = re.compile(r"-?[0-9]+")


def read_text_file(path: Path, what: str) -> str:
    """A text file as UTF-8 (a leading byte-order mark dropped); one error line naming it otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FeatcacheError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise FeatcacheError(f"{what} {path} is not UTF-8 text (line {line}, byte {exc.start}: "
                             f"{raw[exc.start:exc.start + 1]!r}); save it as UTF-8") from None


def parse_list_file(path: Path) -> list[tuple[str, int]]:
    """``relative/path.jpg <label>`` per line (ImageNet-LT / Places-LT / iNaturalist-2018 lists);
    UTF-8 (a byte-order mark is dropped), labels in ASCII digits."""
    if not path.is_file():
        raise FeatcacheError(f"list file {path} does not exist")
    items = []
    for number, line in enumerate(read_text_file(path, "list file").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            raise FeatcacheError(f"{path}:{number}: expected '<relative path> <integer label>' (ASCII digits), "
                                 f"got {line.strip()!r}")
        label = int(parts[1])
        if label < 0:
            raise FeatcacheError(f"{path}:{number}: label {label} is negative")
        items.append((parts[0], label))
    return items


def load_txt(data_root=None, **options) -> DataSource:
    """Text lists, one per split (``--list SPLIT=FILE``), paths relative to --data-root.

    ``options``: :class:`TxtOptions`."""
    declared = dataset_options("txt", options)
    root = _require_root(data_root, None, "txt")
    if not declared.lists:
        raise FeatcacheError("--data txt needs at least one --list SPLIT=FILE")
    lists = dict(declared.lists)
    parsed = {split: parse_list_file(Path(file)) for split, file in lists.items()}
    for split, items in parsed.items():
        if not items:
            raise FeatcacheError(f"list file {lists[split]} (split {split!r}) is empty")
    reference = parsed.get("train") or next(iter(parsed.values()))
    classes = int(declared.num_classes or max(lbl for _, lbl in reference) + 1)
    for split, items in parsed.items():
        for number, (_, label) in enumerate(items, start=1):
            if label >= classes:
                raise FeatcacheError(f"{lists[split]}: entry {number} has label {label}, out of "
                                     f"range for {classes} classes")
    return _file_source("txt", root, parsed, classes, declared, [])


DATASETS = {
    "digits-lt": load_digits_lt,
    "fashion-mnist-lt": load_fashion_mnist_lt,
    "mnist-lt": load_mnist_lt,
    "cifar10-lt": load_cifar10_lt,
    "cifar100-lt": load_cifar100_lt,
    "imagefolder": load_imagefolder,
    "txt": load_txt,
}

# the options each data set declares; any other is refused (dataset_options)
DATASET_OPTIONS = {
    "digits-lt": DigitsOptions,
    "fashion-mnist-lt": LongTailOptions,
    "mnist-lt": LongTailOptions,
    "cifar10-lt": LongTailOptions,
    "cifar100-lt": Cifar100Options,
    "imagefolder": ImageFolderOptions,
    "txt": TxtOptions,
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
        """The data set; an option it does not declare is a one-line error (:func:`dataset_options`)."""
        if self.name not in DATASETS:
            raise FeatcacheError(f"unknown --data {self.name!r}; choose one of {', '.join(DATASETS)}")
        options = {k: v for k, v in self.options.items() if v is not None}
        return DATASETS[self.name](self.root, **options)
