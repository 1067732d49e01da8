"""Writing an entry: the write transaction (:func:`writing`), the entry and its splits.

Every writer follows one protocol, which :func:`writing` owns: hold the key's lock, remove the
temporary files a killed writer left, write the checkpoint classifier before the first manifest,
commit each finished split to the manifest (atomic replace: from then on it is readable), and on
an error discard what no manifest lists. A request the manifest already satisfies (``needs``) is
answered without the lock and writes nothing (a read-only cache root serves hits). Callers write
inside one ``with`` block::

    with writing(root, key, base_meta) as entry:
        entry.write_classifier(W, b)               # optional; kept only for a new entry
        entry.write_split("train", X, y)           # or split_writer(...) shard by shard
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from ..errors import FeatcacheError
from .checksum import sha256_file
from .durable import atomic_write_json, create_h5, disk_error, is_temporary, make_dir, staged
from .entries import entry_lock, entry_name_problem, is_entry_dir
from .format import CHUNK_BYTES, CLASSIFIER_FILE, COMPRESSIONS, DTYPES, ENTRY_MARKER, FORMAT_VERSION, MANIFEST
from .reader import FeatureCache


@contextlib.contextmanager
def writing(root: Path, key: str, base_meta: dict, *, name: str | None = None,
            coordinator: bool = True, needs: Collection[str] | None = None) -> Iterator["EntryWriter"]:
    """The write transaction of one entry (see the module docstring).

    ``name`` names the entry (refused when another entry has it). Under ``torchrun`` every rank
    writes its own shards inside the block, and only the ``coordinator`` (rank 0) locks the key,
    cleans up, writes the classifier, commits splits and discards on error.

    ``needs``: the splits the caller is about to ask for. When the entry's manifest already lists
    every one of them (and already carries ``name``), nothing will be written: the manifest is read
    without the lock and the block runs with :attr:`EntryWriter.read_only` set, so a complete entry
    under a read-only cache root is a hit."""
    entry = EntryWriter(root, key, base_meta, coordinator=coordinator)
    if needs is not None and entry.is_complete_for(needs, name):
        entry.read_only = True
        yield entry
        return
    with entry_lock(root, key) if coordinator else contextlib.nullcontext():
        if coordinator:
            entry.remove_stale_temporaries()
            if name is not None:
                entry.set_name(name)
        try:
            yield entry
        except Exception:
            if coordinator:
                entry.discard_incomplete()
            raise


def _file_record(path: Path, entry: Path, sha256: str | None = None, **extra) -> dict:
    """The manifest's record of a file; ``sha256`` when already known for exactly this file."""
    stat = path.stat()
    return {"file": path.relative_to(entry).as_posix(), "sha256": sha256 or sha256_file(path),
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **extra}


class EntryWriter:
    """Creates or extends one entry; use it through :func:`writing`, which holds the key's lock."""

    def __init__(self, root: Path, key: str, base_meta: dict, *, coordinator: bool = True):
        self.root = Path(root)
        self.key = key
        self.path = self.root / key
        self.base_meta = base_meta
        self.coordinator = coordinator
        self.classifier_record: dict | None = None  # goes into the entry's first manifest
        self.read_only = False  # a hit found without the lock (:func:`writing` ``needs``): write nothing

    def is_complete_for(self, splits: Collection[str], name: str | None) -> bool:
        """Whether the entry's manifest (read without the lock; it is replaced atomically) lists every
        split of ``splits`` and, if ``name`` is given, carries that name: then nothing is to be written."""
        try:
            manifest = self.existing_manifest()
        except FeatcacheError:
            return False
        return (manifest is not None and all(s in manifest["splits"] for s in splits)
                and (name is None or manifest.get("name") == name))

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise RuntimeError(f"entry {self.path} was opened as a complete hit; nothing may be written")

    def create_dir(self) -> None:
        """Create the entry directory with its marker (what makes it an entry before a manifest exists)."""
        self._refuse_if_read_only()
        make_dir(self.path)
        marker = self.path / ENTRY_MARKER
        if not marker.is_file():
            try:
                marker.write_text(json.dumps({"format_version": FORMAT_VERSION, "key": self.key}) + "\n")
            except OSError as exc:
                raise disk_error(exc, marker) from None

    def existing_manifest(self) -> dict | None:
        if not (self.path / MANIFEST).is_file():
            return None
        return FeatureCache.open(self.path).meta

    def set_name(self, name: str) -> None:
        """Name the entry (before it exists: in its first manifest; after: by rewriting the manifest).
        A name another entry already carries is refused."""
        problem = entry_name_problem(self.root, name, self.key)
        if problem:
            raise FeatcacheError(f"--name {name!r}: {problem}; choose another name")
        self.base_meta["name"] = name
        manifest = self.existing_manifest()
        if manifest is not None and manifest.get("name") != name:
            manifest["name"] = name
            atomic_write_json(self.path / MANIFEST, manifest)

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

    def write_split(self, name: str, features: np.ndarray, labels: np.ndarray, indices: np.ndarray | None = None,
                    *, num_classes: int | None = None, dtype: str | None = None, shard_rows: int = 65536,
                    compression: str = "none") -> None:
        """Write and commit a whole single-view split from arrays in memory (features are taken as
        float32, then stored in the entry's dtype; shards already complete are kept). ``num_classes``
        and ``dtype`` default to the entry's."""
        rows = len(labels)
        indices = np.arange(rows, dtype=np.int64) if indices is None else indices
        split = self.split_writer(name, rows=rows, dim=features.shape[1], dtype=dtype or self.base_meta["dtype"],
                                  shard_rows=shard_rows, compression=compression)
        for index in split.pending_shards():
            start, stop = split.shard_range(index)
            split.write_shard(index, np.asarray(features[start:stop], np.float32), labels[start:stop],
                              indices[start:stop])
        split.finish(np.bincount(labels, minlength=num_classes or self.base_meta["num_classes"]))

    @property
    def takes_classifier(self) -> bool:
        """Whether :meth:`write_classifier` stores one: only a new entry's coordinator does (an entry
        with a manifest keeps the classifier it was created with)."""
        return self.coordinator and self.existing_manifest() is None

    def write_classifier(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Store the checkpoint's classifier ``(W: C x D, b: C)`` when :attr:`takes_classifier`."""
        if not self.takes_classifier:
            return
        final = self.path / CLASSIFIER_FILE
        self.create_dir()
        with staged(final) as tmp, create_h5(tmp) as handle:
            handle.attrs["format_version"] = FORMAT_VERSION
            for name, values in (("weight", weight), ("bias", bias)):
                handle.create_dataset(name, data=np.asarray(values, "<f4"), fletcher32=True, chunks=True)
        self.classifier_record = _file_record(final, self.path, shape=list(np.shape(weight)))

    def commit_split(self, name: str, split_meta: dict) -> None:
        """Add a finished split to the manifest (atomic replace): from now on it is readable."""
        self._refuse_if_read_only()
        manifest = self.existing_manifest() or {
            **self.base_meta, "format_version": FORMAT_VERSION, "key": self.key,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "splits": {}, "classifier": self.classifier_record}
        manifest["format_version"] = FORMAT_VERSION  # a version-1 entry extended by this writer
        manifest["splits"][name] = split_meta
        atomic_write_json(self.path / MANIFEST, manifest)

    def remove_stale_temporaries(self) -> None:
        """Temporary files left by a killed writer (call holding the key's lock, before writing)."""
        if self.path.is_dir():
            for path in self.path.rglob(".*"):
                if is_temporary(path) and path.is_file():
                    path.unlink(missing_ok=True)

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
            elif is_temporary(child):
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


_SHARD_NAME = re.compile(r"shard-(\d{5,})\.(?:h5|json)")


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
        make_dir(self.dir)
        if entry.coordinator:
            self.remove_unplanned_shards()

    def remove_unplanned_shards(self) -> None:
        """Remove the shard files (and sidecars) of this uncommitted split that this plan does not
        use: an earlier run with another ``--shard-rows`` wrote more shards than this one will."""
        for path in self.dir.iterdir():
            match = _SHARD_NAME.fullmatch(path.name)
            if match and int(match.group(1)) >= self.num_shards and path.is_file() and not path.is_symlink():
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise FeatcacheError(f"cannot remove {path} (left by an earlier run with another "
                                         f"--shard-rows): {exc.strerror or exc}") from None

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.rows // self.shard_rows))

    def shard_range(self, index: int) -> tuple[int, int]:
        return index * self.shard_rows, min(self.rows, (index + 1) * self.shard_rows)

    def rows_in_shard(self, index: int) -> int:
        start, stop = self.shard_range(index)
        return stop - start

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.dir / f"shard-{index:05d}"
        return stem.with_suffix(".h5"), stem.with_suffix(".json")

    def _expected_record(self, index: int) -> dict:
        start, stop = self.shard_range(index)
        return {"row_start": start, "rows": stop - start, "dtype": self.dtype, "dim": self.dim,
                "compression": self.compression, "views": self.views}

    def shard_is_complete(self, index: int) -> bool:
        shard, record_path = self._paths(index)
        if not (shard.is_file() and record_path.is_file()):
            return False
        try:
            record = json.loads(record_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if any(record.get(k) != v for k, v in self._expected_record(index).items()):
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
            stored = features.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False)
        with staged(shard) as tmp:
            self._write_h5(tmp, stored, labels, indices, views, start)
            atomic_write_json(record_path, {**self._expected_record(index), "sha256": sha256_file(tmp),
                                            "size": tmp.stat().st_size})

    def _write_h5(self, path: Path, features, labels, indices, views, start: int) -> None:
        rows = max(1, len(labels))
        itemsize = np.dtype(self.dtype).itemsize
        chunk_rows = int(min(rows, max(1, CHUNK_BYTES // (self.dim * itemsize))))
        compression = None if self.compression == "none" else self.compression
        with create_h5(path) as handle:
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["split"] = self.name
            handle.attrs["row_start"] = start
            handle.create_dataset("features", data=features,
                                  chunks=(chunk_rows, self.dim), fletcher32=True,
                                  compression=compression)
            for key, values in (("labels", labels), ("indices", indices), ("views", views)):
                handle.create_dataset(key, data=np.asarray(values, "<i8"), chunks=(rows,),
                                      fletcher32=True, compression=compression)

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

    def finish(self, class_counts: np.ndarray, extra: dict | None = None) -> None:
        """Commit the split (every shard written) to the manifest, then drop the shards' sidecars."""
        shards = []
        for index in range(self.num_shards):
            shard, record_path = self._paths(index)
            start, stop = self.shard_range(index)
            shards.append(_file_record(shard, self.entry.path, self._recorded_sha256(shard, record_path),
                                       row_start=start, rows=stop - start))
        meta = {"rows": self.rows, "views": self.views, "class_counts": [int(c) for c in class_counts],
                "shards": shards, **(extra or {})}
        self.entry.commit_split(self.name, meta)
        for index in range(self.num_shards):
            self._paths(index)[1].unlink(missing_ok=True)
