"""Durable writes: every file the project writes goes through here (cache entries, sweep records,
training checkpoints).

A file is written all or nothing: under a temporary name beside it (:func:`temporary_path`), fsynced,
renamed over the final name, then the directory fsynced; on an error the temporary file is removed
and the error is one line naming the final file. One exclusive lock (:func:`exclusive_lock`) serves
the cache's entry lock and the sweep's output-directory lock."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import h5py

from ..errors import FeatcacheError

TEMPORARY_MARK = ".tmp-"


def temporary_path(path: Path) -> Path:
    """The name ``path`` is written under before it is renamed into place (``.NAME.tmp-PID``)."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """A file :func:`temporary_path` names (left behind by a killed writer)."""
    return path.name.startswith(".") and TEMPORARY_MARK in path.name


def fsync(path: Path) -> None:
    """fsync a file or a directory (for a directory: the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(exc: OSError, path: Path) -> FeatcacheError:
    """The one-line error for a failed write of ``path``."""
    if exc.errno == errno.ENOSPC:
        return FeatcacheError(f"disk full while writing {path}; temporary files were removed")
    return FeatcacheError(f"cannot write {path}: {exc.strerror or exc}")


def make_dir(path: Path) -> None:
    """``mkdir -p`` whose failure (read-only file system, permissions, disk full) is one line naming it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FeatcacheError(f"cannot create directory {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; on success it is renamed into place
    and the directory fsynced (the caller fsyncs the file itself), on any error it is removed. An
    OSError becomes the one-line :func:`disk_error`."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
        fsync(path.parent)
    except OSError as exc:
        raise disk_error(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb") -> Iterator[io.IOBase]:
    """An open file whose content replaces ``path`` atomically when the block ends without error."""
    with staged(Path(path)) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it (a record log: an interrupted append leaves at most a partial
    last line, which readers skip)."""
    try:
        with open(path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise disk_error(exc, path) from None


class _GuardedFile(io.FileIO):
    """A file for h5py's fileobj driver that turns the first write error (disk full) into a no-op
    and keeps it: HDF5 then closes cleanly (a failed close leaves HDF5 handles that crash the
    interpreter at exit), and :func:`create_h5` raises the error afterwards."""

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
def create_h5(path: Path) -> Iterator[h5py.File]:
    """A new HDF5 file at ``path``, fsynced when the block ends; a write error surfaces as OSError
    after every handle is closed."""
    with _GuardedFile(path, "w+") as raw:
        with h5py.File(raw, "w") as handle:
            yield handle
        if raw.error is not None:
            raise raw.error
        os.fsync(raw.fileno())


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) for the block. With
    ``wait=False`` a lock held by another process raises BlockingIOError at once. The lock goes with
    the process: a killed holder never leaves it behind (docs/reliability.md). A lock file that
    cannot be created (read-only cache root) is one line naming it."""
    try:
        handle = open(path, "a")
    except OSError as exc:
        raise FeatcacheError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
