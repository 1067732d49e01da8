"""The on-disk feature cache (spec: docs/cache-format.md). The only module that imports h5py.

An entry is a directory ``<root>/<key>/`` holding ``manifest.json``, an optional ``classifier.h5``
and one folder of HDF5 shards per split. The manifest is written last, by atomic replace: a split
the manifest does not list is incomplete and is never read as data.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import CorruptEntryError, FeatcacheError, UnknownFormatError

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
# The key hashes this, not FORMAT_VERSION: version 2 changed the files (a ``views`` dataset), not the
# features a single-view key names, so entries written by version 1 keep their keys and stay hits.
KEY_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENTRY_MARKER = ".featcache-entry"
CLASSIFIER_FILE = "classifier.h5"
COMPRESSIONS = ("none", "lzf", "gzip")
DTYPES = ("float32", "float16")
_CHUNK_BYTES = 1 << 20


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FEATCACHE_DIR``, else ``~/.cache/featcache``; refuses a non-directory."""
    if cache_dir:
        root, origin = Path(cache_dir).expanduser(), "--cache-dir"
    elif os.environ.get("FEATCACHE_DIR"):
        root, origin = Path(os.environ["FEATCACHE_DIR"]).expanduser(), "$FEATCACHE_DIR"
    else:
        root, origin = Path.home() / ".cache" / "featcache", "the default cache root"
    if root.exists() and not root.is_dir():
        raise FeatcacheError(f"{origin} {root} is not a directory")
    return root


def content_key(identity: dict) -> str:
    """Hash of everything that changes the features (canonical JSON), with the format version."""
    payload = json.dumps({"format_version": KEY_FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (for a directory: the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(exc: OSError, path: Path) -> FeatcacheError:
    if exc.errno == errno.ENOSPC:
        return FeatcacheError(f"disk full while writing {path}; temporary files were removed")
    return FeatcacheError(f"cannot write {path}: {exc.strerror or exc}")


class _GuardedFile(io.FileIO):
    """A file for h5py's fileobj driver that turns the first write error (disk full) into a no-op
    and keeps it: HDF5 then closes cleanly (a failed close leaves HDF5 handles that crash the
    interpreter at exit), and :func:`_create_h5` raises the error afterwards."""

    error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += super().write(view[done:]) or 0
            except OSError as exc:
                self.error = exc
        return len(view)

    def truncate(self, size=None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as exc:
                self.error = exc
        return size if size is not None else self.tell()


@contextlib.contextmanager
def _create_h5(path: Path):
    """A new HDF5 file at ``path``; a write error surfaces as OSError after every handle is closed."""
    with _GuardedFile(path, "w+") as raw:
        with h5py.File(raw, "w") as handle:
            yield handle
        if raw.error is not None:
            raise raw.error


@dataclass
class Split:
    """Rows of one split: features (rows x D) in the entry's dtype (float32, or float16: half the
    memory; Stage 2 upcasts chunk by chunk), int64 labels, sample ids and view numbers.

    A multi-view split (``num_views`` K > 1) is stored view-major: row ``v * N + i`` is view ``v`` of
    the i-th sample, so ``features.reshape(K, N, D)[v]`` is view ``v`` and rows ``[0, N)`` are view 0."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    views: np.ndarray
    num_views: int = 1

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_samples(self) -> int:
        return len(self.labels) // self.num_views

    def view(self, view: int) -> "Split":
        """The N rows of one view (zero-copy slices)."""
        if not 0 <= view < self.num_views:
            raise FeatcacheError(f"split {self.name!r} has views 0..{self.num_views - 1}, not {view}")
        if self.num_views == 1:
            return self
        rows = slice(view * self.num_samples, (view + 1) * self.num_samples)
        return Split(self.name, self.features[rows], self.labels[rows], self.indices[rows], self.views[rows])

    def view_stack(self) -> np.ndarray:
        """All views as K x N x D (a zero-copy reshape of ``features``)."""
        return self.features.reshape(self.num_views, self.num_samples, -1)


class FeatureCache:
    """A complete cache entry, read through its manifest."""

    def __init__(self, path: Path, manifest: dict, check_chunks: bool = True):
        self.path = path
        self.meta = manifest
        self.check_chunks = check_chunks
        self._loaded: dict[str, Split] = {}
        self._classifier = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_chunks: bool = True) -> "FeatureCache":
        """Open a complete entry. Every read checks each chunk's fletcher32; ``check_chunks=False``
        skips that on the uncompressed fast path, for explicitly trusted scratch entries only."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FeatcacheError(f"{path} is not a complete cache entry (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptEntryError(f"{manifest_path} is not valid JSON: {exc}") from None
        except OSError as exc:
            raise CorruptEntryError(f"{manifest_path} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(manifest, dict):
            raise CorruptEntryError(f"{manifest_path} is not a JSON object")
        version = manifest.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise UnknownFormatError(
                f"{manifest_path} has format_version {version!r}; this featcache reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (upgrade featcache)")
        problem = _manifest_problem(manifest)
        if problem:
            raise CorruptEntryError(f"{manifest_path} is damaged: {problem}")
        return cls(path, manifest, check_chunks)

    def quick_check(self) -> str | None:
        """Every listed file present with its recorded size (no hashing); the first problem, or None."""
        for info in self._listed_files():
            path = self.path / info["file"]
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != info["size"]:
                return f"{path} has {path.stat().st_size} bytes, the manifest says {info['size']}"
        return None

    def _listed_files(self) -> list[dict]:
        files = [s for split in self.meta["splits"].values() for s in split["shards"]]
        if self.meta.get("classifier"):
            files.append(self.meta["classifier"])
        return files

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def class_counts(self, split: str) -> np.ndarray:
        return np.asarray(self._split_meta(split)["class_counts"], dtype=np.int64)

    def _split_meta(self, name: str) -> dict:
        try:
            return self.meta["splits"][name]
        except KeyError:
            raise FeatcacheError(
                f"entry {self.path} has no split {name!r} (it has: {', '.join(self.splits) or 'none'})"
            ) from None

    def num_views(self, split: str) -> int:
        """Views per sample of ``split`` (1 unless extracted with ``--views K``)."""
        return int(self._split_meta(split).get("views", 1))

    def split(self, name: str, view: int | None = 0) -> Split:
        """The rows of one view of split ``name`` (default view 0: one row per sample, the eval
        transform's features); ``view=None`` gives all rows of every view. Loaded once."""
        if name not in self._loaded:
            self._loaded[name] = self._read_split(name)
        split = self._loaded[name]
        return split if view is None else split.view(view)

    def release(self) -> None:
        """Forget the loaded splits (their memory goes back once no caller holds them)."""
        self._loaded.clear()

    @property
    def classifier(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The checkpoint's final linear layer ``(W: C x D, b: C)`` as float32, or None."""
        info = self.meta.get("classifier")
        if info is None:
            return None
        if self._classifier is None:
            path = self.path / info["file"]
            self._check_file(path, info)
            with self._h5(path) as handle:
                self._classifier = (handle["weight"][...].astype(np.float32),
                                    handle["bias"][...].astype(np.float32))
        return self._classifier

    def _check_file(self, path: Path, info: dict) -> None:
        """Trust a file whose size and mtime are as written; otherwise re-hash it."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CorruptEntryError(f"{path} is listed in the manifest but missing") from None
        if stat.st_size == info["size"] and stat.st_mtime_ns == info["mtime_ns"]:
            return
        if stat.st_size != info["size"] or sha256_file(path) != info["sha256"]:
            raise CorruptEntryError(f"{path} fails its sha256 checksum (run `featcache verify`)")

    @contextlib.contextmanager
    def _h5(self, path: Path):
        try:
            with h5py.File(path, "r") as handle:
                yield handle
        except (OSError, KeyError) as exc:
            raise CorruptEntryError(f"{path} cannot be read ({exc}); run `featcache verify`") from None

    def _read_split(self, name: str) -> Split:
        meta = self._split_meta(name)
        rows, dim = int(meta["rows"]), int(self.meta["feature_dim"])
        features = np.empty((rows, dim), dtype=np.float16 if self.meta["dtype"] == "float16" else np.float32)
        labels = np.empty(rows, dtype=np.int64)
        indices = np.empty(rows, dtype=np.int64)
        views = np.empty(rows, dtype=np.int64)
        num_views = self.num_views(name)
        for shard in meta["shards"]:
            path = self.path / shard["file"]
            self._check_file(path, shard)
            start, stop = shard["row_start"], shard["row_start"] + shard["rows"]
            with self._h5(path) as handle:
                for key, out in (("features", features), ("labels", labels), ("indices", indices),
                                 ("views", views)):
                    if key == "views" and key not in handle and num_views == 1:
                        out[start:stop] = 0  # written by format version 1: one view
                        continue
                    if key not in handle:
                        raise CorruptEntryError(f"{path} has no {key!r} dataset")
                    _read_into(handle[key], out[start:stop], self.check_chunks)
            outside = labels[start:stop][(labels[start:stop] < 0) | (labels[start:stop] >= self.num_classes)]
            if len(outside):
                raise CorruptEntryError(f"{path}: label {int(outside[0])} is outside 0..{self.num_classes - 1} "
                                        "(num_classes in the manifest)")
        samples = rows // num_views
        if not np.array_equal(views, np.arange(rows) // max(1, samples)):
            raise CorruptEntryError(f"{self.path / name}: the 'views' of split {name!r} are not in the documented "
                                    f"view-major order for {num_views} view(s) of {samples} samples")
        for view in range(1, num_views):
            block = slice(view * samples, (view + 1) * samples)
            if not (np.array_equal(indices[block], indices[:samples]) and np.array_equal(labels[block], labels[:samples])):
                raise CorruptEntryError(f"{self.path / name}: view {view} of split {name!r} does not hold the samples "
                                        "of view 0 in the same order")
        counts = np.bincount(labels[:samples], minlength=self.num_classes)
        if not np.array_equal(counts, self.class_counts(name)):
            raise CorruptEntryError(f"{self.path / MANIFEST}: class_counts of split {name!r} do not match "
                                    "the labels in its shards")
        return Split(name, features, labels, indices, views, num_views)

    def verify(self) -> list[str]:
        """Re-hash every file the manifest lists; return one message per bad file."""
        problems = []
        for info in self._listed_files():
            path = self.path / info["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != info["sha256"]:
                problems.append(f"{path}: sha256 mismatch")
        if problems:
            return problems
        for name in self.splits:  # every chunk's fletcher32, shapes, rows and class counts
            try:
                FeatureCache(self.path, self.meta)._read_split(name)
            except CorruptEntryError as exc:
                problems.append(str(exc))
        return problems

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _file_problem(info, where: str) -> str | None:
    if not isinstance(info, dict):
        return f"{where} is not an object"
    for field_name in ("file", "sha256"):
        if not isinstance(info.get(field_name), str):
            return f"{where} has no {field_name!r}"
    parts = Path(info["file"]).parts
    if Path(info["file"]).is_absolute() or ".." in parts or not parts:
        return f"{where} names a file outside the entry ({info['file']!r})"
    if not (_is_int(info.get("size")) and _is_int(info.get("mtime_ns"))):
        return f"{where} has no valid size / mtime_ns"
    return None


def _manifest_problem(meta: dict) -> str | None:
    """What makes a manifest unusable (missing or mistyped fields), or None."""
    if not isinstance(meta.get("key"), str):
        return "no 'key'"
    if not _is_int(meta.get("feature_dim"), 1) or not _is_int(meta.get("num_classes"), 1):
        return "'feature_dim' and 'num_classes' must be positive integers"
    if meta.get("dtype") not in DTYPES:
        return f"'dtype' is {meta.get('dtype')!r}, not one of {', '.join(DTYPES)}"
    if meta.get("classifier") is not None:
        problem = _file_problem(meta["classifier"], "'classifier'")
        if problem:
            return problem
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "no 'splits' object"
    for name, split in splits.items():
        if not isinstance(split, dict) or not _is_int(split.get("rows")):
            return f"split {name!r} has no valid 'rows'"
        counts = split.get("class_counts")
        if not isinstance(counts, list) or len(counts) != meta["num_classes"] or not all(_is_int(c) for c in counts):
            return f"split {name!r}: 'class_counts' must be {meta['num_classes']} non-negative integers"
        views = split.get("views", 1)
        if not _is_int(views, 1) or (views > 1 and meta.get("format_version") == 1):
            return f"split {name!r}: 'views' must be a positive integer (and 1 in format_version 1)"
        if split["rows"] % views or sum(counts) != split["rows"] // views:
            return (f"split {name!r}: 'class_counts' sum to {sum(counts)} samples, but 'rows' is "
                    f"{split['rows']} for {views} view(s) per sample")
        shards = split.get("shards")
        if not isinstance(shards, list) or not shards:
            return f"split {name!r} lists no shards"
        expected_start = 0
        for number, shard in enumerate(shards):
            where = f"split {name!r} shard {number}"
            problem = _file_problem(shard, where)
            if problem:
                return problem
            if shard.get("row_start") != expected_start or not _is_int(shard.get("rows")):
                return f"{where} does not continue at row {expected_start}"
            expected_start += shard["rows"]
        if expected_start != split["rows"]:
            return f"split {name!r}: its shards hold {expected_start} rows, 'rows' is {split['rows']}"
    return None


def _read_into(dataset, out: np.ndarray, check_chunks: bool = True) -> None:
    if dataset.shape[0] != out.shape[0]:
        raise CorruptEntryError(f"{dataset.file.filename}: {dataset.name} has {dataset.shape[0]} rows, "
                                f"manifest says {out.shape[0]}")
    if dataset.shape[1:] != out.shape[1:]:
        raise CorruptEntryError(f"{dataset.file.filename}: {dataset.name} has shape {dataset.shape}, "
                                f"manifest says {out.shape}")
    if check_chunks and not dataset.fletcher32:
        raise CorruptEntryError(f"{dataset.file.filename}: {dataset.name} has no fletcher32 checksums")
    if dataset.dtype != out.dtype:
        out[...] = dataset[...]  # through HDF5's filter pipeline, which checks fletcher32 itself
    elif not _read_raw_chunks(dataset, out, check_chunks):
        dataset.read_direct(out)


_WORDS_PER_ROW = 1024
_ROWS_PER_BLOCK = 4096  # column sums of <= 4096 rows of 16-bit words fit in uint32


def fletcher32(data) -> int:
    """HDF5's Fletcher-32 (H5_checksum_fletcher32) of a bytes-like object, vectorised.

    HDF5 sums big-endian 16-bit words w_i (i < n): s1 = sum w_i and s2 = sum (n - i) w_i, both
    folded modulo 65535 (0 only for all-zero data, else in 1..65535). Swapping a word's two bytes
    multiplies it by 256 modulo 65535, so native little-endian words are summed and scaled by 256.
    Both sums come from one row-sum and one column-sum pass over a words x 1024 matrix."""
    raw = np.frombuffer(data, np.uint8)
    if len(raw) % 2:
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    words = raw.view("<u2")
    n, total, weighted = len(words), 0, 0
    block = _WORDS_PER_ROW * _ROWS_PER_BLOCK
    for offset in range(0, n, block):
        part = words[offset:offset + block]
        rows = len(part) // _WORDS_PER_ROW
        head = part[:rows * _WORDS_PER_ROW].reshape(rows, _WORDS_PER_ROW)
        tail = part[rows * _WORDS_PER_ROW:].astype(np.uint64)
        row_sums = head.sum(axis=1, dtype=np.uint32).astype(np.uint64)
        col_sums = head.sum(axis=0, dtype=np.uint32).astype(np.uint64)
        part_total = int(col_sums.sum()) + int(tail.sum())
        local = (_WORDS_PER_ROW * int(np.arange(rows, dtype=np.uint64) @ row_sums)
                 + int(np.arange(_WORDS_PER_ROW, dtype=np.uint64) @ col_sums)
                 + int(np.arange(rows * _WORDS_PER_ROW, len(part), dtype=np.uint64) @ tail))
        total += part_total
        weighted += (n - offset) * part_total - local
    if sys.byteorder == "little":
        total, weighted = 256 * total, 256 * weighted
    if total == 0:
        return 0
    return ((weighted - 1) % 65535 + 1) << 16 | ((total - 1) % 65535 + 1)


def _stored_fletcher_matches(data, stored: bytes) -> bool:
    """HDF5 accepts the checksum in either of its historical byte orders; so do we."""
    value = fletcher32(data)
    little = int.from_bytes(stored, "little")
    swapped = int.from_bytes(bytes((stored[1], stored[0], stored[3], stored[2])), "little")
    return value in (little, swapped)


def _read_raw_chunks(dataset, out: np.ndarray, check_chunks: bool = True) -> bool:
    """Copy uncompressed row chunks straight from the file into ``out`` (one pass, like np.load),
    checking each chunk's fletcher32 on the raw bytes unless ``check_chunks`` is False.

    Returns False where the layout does not allow it (compression, partial-width chunks, an
    HDF5 without chunk queries); h5py then reads it, and HDF5's filter checks fletcher32."""
    chunks = dataset.chunks
    if (chunks is None or dataset.compression is not None or not out.flags.c_contiguous
            or tuple(chunks[1:]) != tuple(dataset.shape[1:]) or not hasattr(dataset.id, "get_chunk_info")):
        return False
    row_bytes = out[:1].nbytes if len(out) else 0
    chunk_bytes = chunks[0] * row_bytes
    extra = 4 if dataset.fletcher32 else 0
    target = memoryview(out.reshape(-1).view(np.uint8))
    filename = dataset.file.filename
    scratch, checks = None, []
    with open(filename, "rb", buffering=0) as handle, ThreadPoolExecutor(1) as checker:
        for index in range(dataset.id.get_num_chunks()):
            info = dataset.id.get_chunk_info(index)
            if info.filter_mask != 0 or info.size != chunk_bytes + extra:
                return False
            start = info.chunk_offset[0] * row_bytes
            stop = min(start + chunk_bytes, out.nbytes)
            handle.seek(info.byte_offset)
            if stop - start == chunk_bytes:  # a full chunk lands in place
                view, got = target[start:stop], handle.readinto(target[start:stop])
                stored = handle.read(extra)
            else:  # the last, partial chunk is stored padded to full size
                scratch = scratch or bytearray(chunk_bytes + extra)
                if handle.readinto(scratch) != len(scratch):
                    raise CorruptEntryError(f"{filename}: {dataset.name} is truncated")
                view, stored = memoryview(scratch)[:chunk_bytes], bytes(scratch[chunk_bytes:])
                target[start:stop] = view[:stop - start]
                got = stop - start
            if got != stop - start or len(stored) != extra:
                raise CorruptEntryError(f"{filename}: {dataset.name} is truncated")
            if check_chunks and extra:  # checksummed in a second thread while the next chunk is read
                checks.append((index, checker.submit(_stored_fletcher_matches, view, stored)))
    for index, matches in checks:
        if not matches.result():
            raise CorruptEntryError(f"{filename} fails its checksum ({dataset.name}, chunk {index}); "
                                    "run `featcache verify`")
    return True


# --------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def entry_lock(root: Path, key: str):
    """Exclusive lock on one key: a second writer of the same key waits here, then reuses."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_record(path: Path, entry: Path, sha256: str | None = None, **extra) -> dict:
    """The manifest's record of a file; ``sha256`` when already known for exactly this file."""
    stat = path.stat()
    return {"file": path.relative_to(entry).as_posix(), "sha256": sha256 or sha256_file(path),
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **extra}


class EntryWriter:
    """Creates or extends one entry. Call under :func:`entry_lock` for the key."""

    def __init__(self, root: Path, key: str, base_meta: dict):
        self.root = Path(root)
        self.key = key
        self.path = self.root / key
        self.base_meta = base_meta

    def create_dir(self) -> None:
        """Create the entry directory with its marker (what makes it an entry before a manifest exists)."""
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self.path / ENTRY_MARKER
        if not marker.is_file():
            try:
                marker.write_text(json.dumps({"format_version": FORMAT_VERSION, "key": self.key}) + "\n")
            except OSError as exc:
                raise _disk_error(exc, marker) from None

    def existing_manifest(self) -> dict | None:
        if not (self.path / MANIFEST).is_file():
            return None
        return FeatureCache.open(self.path).meta

    def set_name(self, name: str) -> None:
        """Name the entry (before it exists: in its first manifest; after: by rewriting the manifest).
        A name another entry already carries is refused."""
        if not name or "/" in name or name in (".", ".."):
            raise FeatcacheError(f"--name {name!r}: a name is a non-empty word without '/'")
        taken = [e for e in list_entries(self.root) if e.meta.get("name") == name and e.key != self.key]
        if taken:
            raise FeatcacheError(f"--name {name!r} already names entry {taken[0].key}; choose another name")
        self.base_meta["name"] = name
        manifest = self.existing_manifest()
        if manifest is not None and manifest.get("name") != name:
            manifest["name"] = name
            _atomic_write_json(self.path / MANIFEST, manifest)

    def complete_splits(self) -> list[str]:
        manifest = self.existing_manifest()
        return list(manifest["splits"]) if manifest else []

    def split_writer(self, name: str, *, rows: int, dim: int, dtype: str, shard_rows: int,
                     compression: str = "none", views: int = 1) -> "SplitWriter":
        if dtype not in DTYPES:
            raise FeatcacheError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if compression not in COMPRESSIONS:
            raise FeatcacheError(f"--compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
        if shard_rows < 1:
            raise FeatcacheError(f"--shard-rows must be at least 1 (got {shard_rows})")
        self.create_dir()
        if views < 1 or rows % views:
            raise FeatcacheError(f"--views {views}: a split of {rows} rows cannot hold {views} views per sample")
        return SplitWriter(self, name, rows, dim, dtype, shard_rows, compression, views)

    def write_classifier(self, weight: np.ndarray, bias: np.ndarray) -> dict:
        final = self.path / CLASSIFIER_FILE
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.create_dir()
        try:
            with _create_h5(tmp) as handle:
                handle.attrs["format_version"] = FORMAT_VERSION
                handle.create_dataset("weight", data=np.asarray(weight, np.float32), fletcher32=True,
                                      chunks=True)
                handle.create_dataset("bias", data=np.asarray(bias, np.float32), fletcher32=True,
                                      chunks=True)
            _fsync(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, final) from None
        return _file_record(final, self.path, shape=list(np.shape(weight)))

    def commit_split(self, name: str, split_meta: dict, classifier: dict | None = None) -> None:
        """Add a finished split to the manifest (atomic replace): from now on it is readable."""
        manifest = self.existing_manifest() or {
            **self.base_meta, "format_version": FORMAT_VERSION, "key": self.key,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "splits": {}, "classifier": classifier}
        manifest["format_version"] = FORMAT_VERSION  # a version-1 entry extended by this writer
        manifest["splits"][name] = split_meta
        _atomic_write_json(self.path / MANIFEST, manifest)

    def remove_stale_temporaries(self) -> None:
        """Temporary files left by a killed writer (call holding the key's lock, before writing)."""
        if self.path.is_dir():
            for tmp in self.path.rglob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def discard_incomplete(self) -> None:
        """Remove an entry that has no manifest yet, or the unlisted split folders of one that has.
        Only this writer's own entry directory (marked, not a link) is ever touched."""
        if self.path.is_symlink() or not is_entry_dir(self.path):
            return
        if not (self.path / MANIFEST).is_file():
            shutil.rmtree(self.path, ignore_errors=True)
            return
        listed = set(self.complete_splits())
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink() and child.name not in listed:
                shutil.rmtree(child, ignore_errors=True)
            elif child.name.startswith(".") and ".tmp-" in child.name:
                child.unlink(missing_ok=True)


def cast_overflow(values: np.ndarray, dtype: str) -> str | None:
    """Why ``values`` cannot be stored as ``dtype`` (a finite value that would become Inf), or None."""
    with np.errstate(over="ignore"):
        stored = values.astype(dtype, copy=False)
    if stored is values:
        return None
    bad = np.flatnonzero(np.isinf(stored) & np.isfinite(values))
    if not len(bad):
        return None
    row, value = int(bad[0]) // max(1, values.shape[-1]), values.flat[int(bad[0])]
    return (f"feature value {value:.6g} at row {row} cannot be stored as {dtype} "
            f"(largest {float(np.finfo(dtype).max):.6g})")


class SplitWriter:
    """Writes one split shard by shard. Shard i holds rows [i*shard_rows, (i+1)*shard_rows); with
    ``views`` K > 1 the rows are view-major (row v*N + i = view v of sample i; N = rows / K).

    Each shard is written under a temporary name, hashed into a small sidecar record, then renamed
    into place; a rerun keeps every shard whose file and record agree (resume)."""

    def __init__(self, entry: EntryWriter, name: str, rows: int, dim: int, dtype: str,
                 shard_rows: int, compression: str, views: int = 1):
        if not name or "/" in name or name.startswith("."):
            raise FeatcacheError(f"invalid split name {name!r}")
        self.entry, self.name, self.rows, self.dim = entry, name, rows, dim
        self.dtype, self.shard_rows, self.compression, self.views = dtype, shard_rows, compression, views
        self.dir = entry.path / name
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.rows // self.shard_rows))

    def shard_range(self, index: int) -> tuple[int, int]:
        return index * self.shard_rows, min(self.rows, (index + 1) * self.shard_rows)

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.dir / f"shard-{index:05d}"
        return stem.with_suffix(".h5"), stem.with_suffix(".json")

    def shard_is_complete(self, index: int) -> bool:
        shard, record_path = self._paths(index)
        if not (shard.is_file() and record_path.is_file()):
            return False
        try:
            record = json.loads(record_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        start, stop = self.shard_range(index)
        expected = {"row_start": start, "rows": stop - start, "dtype": self.dtype, "dim": self.dim,
                    "compression": self.compression, "views": self.views}
        if any(record.get(k) != v for k, v in expected.items()):
            return False
        return shard.stat().st_size == record["size"] and sha256_file(shard) == record["sha256"]

    def pending_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_is_complete(i)]

    def write_shard(self, index: int, features: np.ndarray, labels: np.ndarray,
                    indices: np.ndarray) -> None:
        start, stop = self.shard_range(index)
        if features.shape != (stop - start, self.dim):
            raise ValueError(f"shard {index} expects {(stop - start, self.dim)}, got {features.shape}")
        shard, record_path = self._paths(index)
        views = np.arange(start, stop) // max(1, self.rows // self.views)
        overflow = cast_overflow(features, self.dtype)
        if overflow:
            raise FeatcacheError(f"split {self.name!r} ({shard}): {overflow}; use --dtype float32")
        with np.errstate(over="ignore"):  # only NaN / Inf that were already there (--allow-nonfinite)
            stored = features.astype(self.dtype, copy=False)
        tmp = shard.with_name(f".{shard.name}.tmp-{os.getpid()}")
        try:
            self._write_h5(tmp, stored, labels, indices, views, start)
            record = {"row_start": start, "rows": stop - start, "dtype": self.dtype, "dim": self.dim,
                      "compression": self.compression, "views": self.views, "sha256": sha256_file(tmp),
                      "size": tmp.stat().st_size}
            _atomic_write_json(record_path, record)
            os.replace(tmp, shard)
            _fsync(self.dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, shard) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _write_h5(self, path: Path, features, labels, indices, views, start: int) -> None:
        rows = max(1, len(labels))
        itemsize = np.dtype(self.dtype).itemsize
        chunk_rows = int(min(rows, max(1, _CHUNK_BYTES // (self.dim * itemsize))))
        compression = None if self.compression == "none" else self.compression
        with _create_h5(path) as handle:
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["split"] = self.name
            handle.attrs["row_start"] = start
            handle.create_dataset("features", data=features,
                                  chunks=(chunk_rows, self.dim), fletcher32=True,
                                  compression=compression)
            for key, values in (("labels", labels), ("indices", indices), ("views", views)):
                handle.create_dataset(key, data=np.asarray(values, np.int64), chunks=(rows,),
                                      fletcher32=True, compression=compression)
        _fsync(path)

    @staticmethod
    def _recorded_sha256(shard: Path, record_path: Path) -> str | None:
        """The SHA-256 that :meth:`write_shard` took of the shard's file (or that resuming verified),
        when its sidecar record is there and still matches the file's size; else None (hash again)."""
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or record.get("size") != shard.stat().st_size:
            return None
        sha = record.get("sha256")
        return sha if isinstance(sha, str) and len(sha) == 64 else None

    def rows_in_shard(self, index: int) -> int:
        return self.shard_range(index)[1] - self.shard_range(index)[0]

    def finish(self, class_counts: np.ndarray, classifier: dict | None = None,
               extra: dict | None = None) -> None:
        shards = []
        for index in range(self.num_shards):
            shard, record_path = self._paths(index)
            start, stop = self.shard_range(index)
            shards.append(_file_record(shard, self.entry.path, self._recorded_sha256(shard, record_path),
                                       row_start=start, rows=stop - start))
        meta = {"rows": self.rows, "views": self.views, "class_counts": [int(c) for c in class_counts],
                "shards": shards, **(extra or {})}
        self.entry.commit_split(self.name, meta, classifier)
        for index in range(self.num_shards):
            self._paths(index)[1].unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Finding entries

KEY_PREFIX_MIN = 4


def is_entry_dir(path: Path) -> bool:
    """A directory this project wrote as an entry: it holds the entry marker, or a manifest that
    names it (``key`` equal to the folder name), or any ``manifest.json`` in a folder named like a key."""
    if not path.is_dir():
        return False
    if (path / ENTRY_MARKER).is_file():
        return True
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    if len(path.name) == 24 and all(c in "0123456789abcdef" for c in path.name):
        return True
    try:
        meta = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(meta, dict) and meta.get("key") == path.name and "format_version" in meta


def _entry_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [child for child in sorted(root.iterdir()) if not child.name.startswith(".") and is_entry_dir(child)]


def list_entries(root: Path) -> list[FeatureCache]:
    """Complete, readable entries under ``root`` (incomplete and damaged ones are skipped), oldest first."""
    entries = []
    for child in _entry_dirs(root):
        with contextlib.suppress(FeatcacheError):
            entries.append(FeatureCache.open(child))
    return sorted(entries, key=lambda e: e.meta.get("created", ""))


@dataclass
class EntryStatus:
    """One entry directory as ``featcache ls`` shows it: ``ok``, ``incomplete`` or ``damaged: reason``."""

    path: Path
    status: str
    cache: FeatureCache | None = None


def scan_entries(root: Path) -> list[EntryStatus]:
    """Every entry directory under ``root`` with a quick status (manifest, files present, sizes)."""
    out = []
    for child in _entry_dirs(root):
        if not (child / MANIFEST).is_file():
            out.append(EntryStatus(child, "incomplete"))
            continue
        try:
            cache = FeatureCache.open(child)
        except FeatcacheError as exc:
            out.append(EntryStatus(child, f"damaged: {_reason(exc, child)}"))
            continue
        problem = cache.quick_check()
        out.append(EntryStatus(child, f"damaged: {_reason(problem, child)}" if problem else "ok", cache))
    return sorted(out, key=lambda e: (e.cache.meta.get("created", "") if e.cache else "", e.path.name))


def _reason(problem, entry: Path) -> str:
    return str(problem).replace(f"{entry}/", "")


def resolve_entry(ref: str, root: Path) -> Path:
    """An entry given as a key, a unique key prefix (>= 4 characters), an entry name, or a path to an
    entry directory. The cache root is searched first, then the working directory."""
    text = str(ref)
    if not text.strip() or Path(text) in (Path("."), Path("..")):
        raise FeatcacheError(f"{text!r} does not name a cache entry (give a key, a name or an entry path)")
    if "/" not in text and not text.startswith((".", "~")):
        if is_entry_dir(root / text):
            return root / text
        entries = list_entries(root)
        matches = ([e.path for e in entries if e.meta.get("name") == text]
                   or [e.path for e in entries if len(text) >= KEY_PREFIX_MIN and e.key.startswith(text)])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise FeatcacheError(f"entry {text!r} is ambiguous under {root}: {', '.join(m.name for m in matches)}")
    as_path = Path(text).expanduser()
    if is_entry_dir(as_path):
        return as_path
    if as_path.exists():
        raise FeatcacheError(f"{as_path} is not a cache entry (no {MANIFEST} or {ENTRY_MARKER} in it)")
    raise FeatcacheError(f"no cache entry {text!r} (not a key, key prefix or name under {root}, nor an entry directory)")


def remove_entry(path: Path) -> None:
    """Delete one entry directory; refuses links and anything that is not an entry."""
    path = Path(path)
    if path.is_symlink():
        raise FeatcacheError(f"{path} is a symbolic link; `featcache rm` does not follow links "
                             "(remove the link, or rm the entry it points to)")
    if not is_entry_dir(path):
        raise FeatcacheError(f"{path} is not a cache entry (no {MANIFEST} or {ENTRY_MARKER} in it); nothing removed")
    root, key = path.parent, path.name
    lock = entry_lock(root, key) if (root / ".locks").is_dir() else contextlib.nullcontext()
    try:
        with lock:
            shutil.rmtree(path)
    except OSError as exc:
        raise FeatcacheError(f"cannot remove {path}: {exc.strerror or exc}") from None
