"""Reading a complete entry through its manifest: the splits' rows, the checkpoint classifier, and
the checks every read makes (file size and mtime else SHA-256, each chunk's Fletcher-32, shapes,
labels, views and class counts)."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import CorruptEntryError, FeatcacheError, UnknownFormatError
from .checksum import sha256_file, stored_fletcher_matches
from .durable import is_temporary
from .format import ENTRY_MARKER, MANIFEST, SUPPORTED_FORMAT_VERSIONS, manifest_problem


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units (``32.0 PiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} PiB"


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
    def open(cls, path: str | os.PathLike, *, check_chunks: bool = True,
             cache_dir: str | os.PathLike | None = None) -> "FeatureCache":
        """Open a complete entry: an entry directory, or, as the CLI takes them, a key, a unique key
        prefix or an entry name under ``cache_dir`` (default ``$FEATCACHE_DIR``, else
        ``~/.cache/featcache``). Every read checks each chunk's fletcher32; ``check_chunks=False``
        skips that on the uncompressed fast path, for explicitly trusted scratch entries only."""
        path = Path(path)
        if not path.is_dir() and "/" not in str(path):
            from .entries import cache_root, resolve_entry
            path = resolve_entry(str(path), cache_root(cache_dir))
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
        problem = manifest_problem(manifest)
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

    def check_files(self, splits: list[str] | None = None) -> str | None:
        """The first problem of the files of ``splits`` (default: all) and the classifier under the
        check every read makes (present; size and mtime as written, else SHA-256), or None."""
        for info in self._listed_files(splits):
            try:
                self._check_file(self.path / info["file"], info)
            except CorruptEntryError as exc:
                return str(exc)
        return None

    def _listed_files(self, splits: list[str] | None = None) -> list[dict]:
        """The manifest's entries of the shards of ``splits`` (default: every split) and the classifier."""
        names = self.splits if splits is None else splits
        files = [s for name in names for s in self._split_meta(name)["shards"]]
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
                weight, bias = (_dataset(handle, name) for name in ("weight", "bias"))
                classes = weight.shape[0] if len(weight.shape) == 2 else -1
                shapes = ((classes, self.meta["feature_dim"]), (classes,))
                for dataset, shape in zip((weight, bias), shapes):  # before allocating anything
                    _check_layout(dataset, FLOAT_TYPES["float32"], shape)
                arrays = tuple(np.empty(shape, np.float32) for shape in shapes)
                for dataset, out in zip((weight, bias), arrays):
                    _read_through_hdf5(dataset, out)
            self._classifier = arrays
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
        """The HDF5 file at ``path``; anything HDF5 or h5py raise on a damaged file is one
        :class:`CorruptEntryError` naming it."""
        try:
            with h5py.File(path, "r", locking=False) as handle:
                yield handle
        except CorruptEntryError:
            raise
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError, RuntimeError, ... on damage
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CorruptEntryError(f"{path} cannot be read ({reason}); run `featcache verify`") from None

    def _allocate(self, name: str, rows: int, dim: int) -> tuple[np.ndarray, ...]:
        """The arrays split ``name`` is read into; a manifest claiming more than this machine's memory
        is one line naming the entry, the split and the size (checked before allocating)."""
        dtype = np.float16 if self.meta["dtype"] == "float16" else np.float32
        needed = rows * (dim * np.dtype(dtype).itemsize + 3 * 8)
        memory = physical_memory()
        message = (f"split {name!r} of entry {self.path}: its manifest says {rows:,} rows of {dim} "
                   f"{self.meta['dtype']} features, which need {format_bytes(needed)} of memory")
        if memory is not None and needed > memory:
            raise FeatcacheError(f"{message}, more than this machine's {format_bytes(memory)} "
                                 "(a damaged manifest? `featcache verify` checks it against the shards)")
        try:
            return (np.empty((rows, dim), dtype=dtype), *(np.empty(rows, dtype=np.int64) for _ in range(3)))
        except (MemoryError, ValueError):
            raise FeatcacheError(f"{message}; they cannot be allocated here (out of memory)") from None

    def _read_split(self, name: str) -> Split:
        meta = self._split_meta(name)
        rows, dim = int(meta["rows"]), int(self.meta["feature_dim"])
        features, labels, indices, views = self._allocate(name, rows, dim)
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
                    _read_into(_dataset(handle, key), out[start:stop], self.check_chunks)
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
        """Re-hash every file the manifest lists, check each shard's datasets against the manifest
        (before any split is loaded: a manifest claiming more rows than its shards hold is named,
        not allocated), then read every split; return one message per problem."""
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
                self._check_shard_layouts(name)
                FeatureCache(self.path, self.meta)._read_split(name)
            except FeatcacheError as exc:
                problems.append(str(exc))
        return problems

    def _check_shard_layouts(self, name: str) -> None:
        """Each shard's datasets have the type, shape and chunking the manifest says (no data read)."""
        dim, h5type = int(self.meta["feature_dim"]), FLOAT_TYPES[self.meta["dtype"]]
        num_views = self.num_views(name)
        for shard in self._split_meta(name)["shards"]:
            path = self.path / shard["file"]
            with self._h5(path) as handle:
                for key in ("features", "labels", "indices", "views"):
                    if key == "views" and key not in handle and num_views == 1:
                        continue
                    shape = (shard["rows"], dim) if key == "features" else (shard["rows"],)
                    _check_layout(_dataset(handle, key), h5type if key == "features" else INDEX_TYPE, shape)

    def unlisted_files(self) -> list[tuple[Path, str]]:
        """Files in the entry directory that the manifest does not name, each with what it likely is
        (the files of a split folder the manifest does not list: one line for the folder). No read
        uses them; `featcache verify` reports them as warnings (docs/reliability.md)."""
        listed = {self.path / info["file"] for info in self._listed_files()}
        listed |= {self.path / MANIFEST, self.path / ENTRY_MARKER}
        out, uncommitted = [], {}
        for path in sorted(self.path.rglob("*")):
            if path in listed or (path.is_dir() and not path.is_symlink()):
                continue
            top = path.relative_to(self.path).parts[0]
            if is_temporary(path):
                why = "a temporary file left by a killed writer (the next write to this entry removes it)"
            elif top in self.meta["splits"] and path.suffix == ".json" and path.with_suffix(".h5") in listed:
                why = (f"the sidecar of a committed shard of split {top!r} (a writer stopped right after the "
                       "commit); no read uses it")
            elif top in self.meta["splits"]:
                why = (f"not a shard of split {top!r} (left over from an earlier run, e.g. with another "
                       "--shard-rows); no read uses it")
            elif path.parent != self.path and (self.path / top).is_dir():
                uncommitted[top] = uncommitted.get(top, 0) + 1
                continue
            else:
                why = "not written by featcache; no read uses it"
            out.append((path, why))
        for top, count in uncommitted.items():
            out.append((self.path / top, f"{count} file(s) of split {top!r}, which is not committed (an "
                                         "interrupted extraction: run it again to finish it)"))
        return out

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


# What the writer stores (docs/cache-format.md), compared in full on every read: a dataset whose
# HDF5 type (size, byte order, precision, exponent bias, ...), shape or filters differ is refused,
# never converted.
FLOAT_TYPES = {"float32": h5py.h5t.IEEE_F32LE, "float16": h5py.h5t.IEEE_F16LE}
INDEX_TYPE = h5py.h5t.STD_I64LE
_FLETCHER32, _DEFLATE, _LZF = h5py.h5z.FILTER_FLETCHER32, h5py.h5z.FILTER_DEFLATE, 32000
_PIPELINES = ((_FLETCHER32,), (_DEFLATE, _FLETCHER32), (_LZF, _FLETCHER32))


def _dataset(handle, key: str):
    item = handle.get(key)
    if not isinstance(item, h5py.Dataset):
        raise CorruptEntryError(f"{handle.filename} has no {key!r} dataset")
    return item


def _check_layout(dataset, h5type, shape: tuple, check_chunks: bool = True) -> None:
    """Refuse ``dataset`` unless its type is exactly ``h5type``, its shape ``shape``, it is stored
    through one of the writer's filter pipelines and its chunks tile it exactly (no chunk missing,
    which HDF5 would read as fill values, none misplaced)."""
    where = f"{dataset.file.filename}: {dataset.name}"
    if len(dataset.shape) != len(shape) or dataset.shape[0] != shape[0]:
        raise CorruptEntryError(f"{where} has {dataset.shape[0] if dataset.shape else 0} rows, "
                                f"manifest says {shape[0]}")
    if dataset.shape != shape:
        raise CorruptEntryError(f"{where} has shape {dataset.shape}, manifest says {shape}")
    if not dataset.id.get_type().equal(h5type):
        raise CorruptEntryError(f"{where} is stored as {dataset.dtype}, not the {np.dtype(h5type.dtype)} "
                                "the manifest and the format say")
    chunks = dataset.chunks
    if chunks is None or min(chunks) < 1:
        raise CorruptEntryError(f"{where} is not stored in chunks")
    plist = dataset.id.get_create_plist()
    pipeline = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    allowed = _PIPELINES if check_chunks else _PIPELINES + tuple(p[:-1] for p in _PIPELINES)
    if pipeline not in allowed:
        raise CorruptEntryError(f"{where} has no fletcher32 checksums" if _FLETCHER32 not in pipeline
                                else f"{where} has an unknown filter pipeline {pipeline}")
    grid = [range(0, size, step) for size, step in zip(shape, chunks)]
    expected = sorted(itertools.product(*grid)) if all(shape) else []
    found = sorted(tuple(dataset.id.get_chunk_info(i).chunk_offset) for i in range(dataset.id.get_num_chunks()))
    if found != expected:
        raise CorruptEntryError(f"{where}: its {len(found)} chunks do not tile its {len(expected)} chunk places")


def _read_into(dataset, out: np.ndarray, check_chunks: bool = True) -> None:
    h5type = FLOAT_TYPES["float16" if out.dtype == np.float16 else "float32"] if out.ndim == 2 else INDEX_TYPE
    _check_layout(dataset, h5type, out.shape, check_chunks)
    if not _read_raw_chunks(dataset, out, check_chunks):
        _read_through_hdf5(dataset, out)


def _read_through_hdf5(dataset, out: np.ndarray) -> None:
    """Read through HDF5's filter pipeline, which checks fletcher32 itself. HDF5 finds each chunk by
    its index, and reads a chunk it cannot find there as fill values: every chunk is looked up the
    same way first, and one that is not found is damage."""
    grid = [range(0, size, step) for size, step in zip(dataset.shape, dataset.chunks)]
    for offset in itertools.product(*grid):
        try:
            dataset.id.read_direct_chunk(offset)
        except (RuntimeError, ValueError, OSError):
            raise CorruptEntryError(f"{dataset.file.filename}: {dataset.name}: chunk {offset} cannot be found "
                                    "in its index") from None
    dataset.read_direct(out)


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
                checks.append((index, checker.submit(stored_fletcher_matches, view, stored)))
    for index, matches in checks:
        if not matches.result():
            raise CorruptEntryError(f"{filename} fails its checksum ({dataset.name}, chunk {index}); "
                                    "run `featcache verify`")
    return True
